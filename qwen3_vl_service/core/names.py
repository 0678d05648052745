"""The names several layers share: environment variables that mark our processes, and the file and
folder names of a service. One owner each; everything else imports them from here."""

from __future__ import annotations

# Environment variable that every process of the service inherits, so that vLLM's EngineCore and
# workers can be found even after their parent died (vLLM #55510, #34643: they survive a SIGKILL of
# the API server).
TAG_ENV = "QWEN3_VL_SERVICE_TAG"
# The run folder of the unit that started the process: tells one service's processes from another's
# (and this checkout's from another user's).
RUN_DIR_ENV = "QWEN3_VL_SERVICE_RUN_DIR"

# A service's files (settings/scope.py puts them in its folders).
STATE_FILE = "service.json"  # the run state of a running vLLM (lifecycle/runstate.py)
RECORD_FILE = "supervisor.json"  # the supervisor's record (lifecycle/supervisor.py)
DEPLOYMENT_FILE = "deployment.json"  # what a start ran: the Deployment's units (lifecycle/units.py)
SERVICE_LOG = "service.log"
LAUNCHER_LOG = "launcher.log"
ROUTER_LOG = "router.log"

# The media server: its /health answer and logger, its files (RUN_DIR/media-<port>-<node>/).
MEDIA_SERVICE_ID = "qwen3_vl_service.media"
MEDIA_PID_FILE = "media_server.pid"
MEDIA_LOG_FILE = "media_server.log"
# How the media server and the log tee show up in a command line.
MEDIA_MARKERS = (MEDIA_SERVICE_ID, "media_server.py", "qwen3-vl-media")
LOGTEE_MARKER = "qwen3_vl_service.lifecycle.logtee"

# Which names hold a secret (masked wherever shown or logged, never written to a file): core/secrets.py.
