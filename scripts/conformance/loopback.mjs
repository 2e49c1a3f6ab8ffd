// Preloaded into the cache-tests origin server (node --import): its server.listen(port)
// would listen on every interface; the conformance run keeps everything on 127.0.0.1.
import net from 'node:net'

const listen = net.Server.prototype.listen
net.Server.prototype.listen = function (port, ...rest) {
  if (/^\d+$/.test(String(port)) && (rest.length === 0 || typeof rest[0] === 'function')) {
    return listen.call(this, Number(port), '127.0.0.1', ...rest)
  }
  return listen.call(this, port, ...rest)
}
