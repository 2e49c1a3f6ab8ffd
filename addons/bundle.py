"""The Waypost bundle: `mitmdump -s addons/bundle.py` runs every addon, driven by one profile.

The list order is the pipeline order: within each hook, earlier addons decide first, and the
observers (metrics, access log) come last so they see every decision, and the runtime addon
after them, so its `running` freezes the heap once every other addon has started.
"""

from addons.accesslog import AccessLog
from addons.acl import Acl
from addons.backlog import Backlog
from addons.caching.addon import Cache
from addons.clirun.addon import Cli
from addons.compress import Compress
from addons.config import Config
from addons.connections import Connections
from addons.contentfilter import ContentFilter
from addons.drain import Drain
from addons.egress import Egress
from addons.filter import Filter
from addons.forwarding import Forwarding
from addons.hygiene import Hygiene
from addons.leanchain import LeanChain
from addons.management import Management
from addons.metrics import Metrics
from addons.ratelimit import RateLimit
from addons.routing.router import Router
from addons.runtime import Runtime
from addons.secheaders import SecHeaders
from addons.statuspage import StatusPage
from addons.tlslistener import TlsListener
from addons.tlspolicy import TlsPolicy
from addons.tracing import Tracing
from addons.upstream import Upstream

addons = [
    Config(),
    LeanChain(),
    Backlog(),
    Connections(),
    Drain(),
    Hygiene(),
    Tracing(),
    Acl(),
    Management(),
    StatusPage(),
    RateLimit(),
    Cli(),
    Filter(),
    Egress(),
    TlsPolicy(),
    TlsListener(),
    Forwarding(),
    Cache(),
    Router(),
    Upstream(),
    ContentFilter(),
    Compress(),
    SecHeaders(),
    Metrics(),
    AccessLog(),
    Runtime(),
]
