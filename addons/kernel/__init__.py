"""Waypost's base layer: the helpers every addon shares. Nothing here imports an addon.

net       addresses, CIDRs, prefix index, client_ip(flow) honouring trusted proxies
hosts     one host-pattern grammar (exact, *.domain, *), IDNA-normalised, a suffix matcher
patching  every patch of mitmproxy internals, one list of checked versions, one chain
endpoints bind(), bearer_status(), addressed_to_proxy(): what the proxy's own endpoints share
options   size/duration/CIDR/choices option parsing into OptionsError, spawn(), reload helpers
record    the typed flow record behind flow.metadata["waypost"]
tls       certificate, key and chain files read and checked (the TLS listener, the schema)
"""
