"""Waypost's base layer: the helpers every addon shares. Nothing here imports an addon.

units     durations (`30s`) and sizes (`10MB`) as operators write them -> ValueError
options   Option + declare() for an addon's option table; size/duration/at_least/choice
          -> OptionsError naming the option; spawn(coro); once(name, factory) across reloads
net       addresses, CIDR lists, prefix index; forwarding_trusted_proxies (declared here) and
          client_ip(flow), the one client address every addon decides on and records
hosts     one host-pattern grammar (exact, *.domain, *), IDNA-normalised; HostIndex, a suffix
          matcher whose cost does not grow with the number of patterns
patching  every patch of mitmproxy internals: one list of checked versions (= pyproject's
          pins), one chain per patched function, ordered by the patch, held by its users
wire      strict HTTP/1 reading below the hooks (head cap, header timeout, trailers, chunked
          body limit), patched through patching; installed and configured by hygiene
endpoints bind(), bearer_status(), addressed_to_proxy(): what the proxy's own endpoints share
record    record(flow): the typed flow record behind flow.metadata["waypost"]
spans     child(), event(), remote(): adding to a request's trace without the tracing addon
tls       certificate, key and chain files read and checked (the TLS listener, the schema)
version   versions(): Waypost's (package metadata), mitmproxy's and Python's
instance  identity(): which worker of how many this process is (set by the supervisor)
reuseport SO_REUSEPORT on a supervised worker's proxy listeners, so all its workers bind them
dispatch  mitmproxy's event dispatch with the addon chain walked once per hook, not per event
logformat the JSON and text log-line shapes, for the workers' logs and the supervisor's
"""
