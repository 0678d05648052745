"""The media file server: local images and videos for vLLM over loopback HTTP."""

# The facts the launcher, stop and status share with the server itself.
SERVICE_ID = "qwen3_vl_service.media"  # in /health, and the logger's name
PID_FILE_NAME = "media_server.pid"  # in RUN_DIR/media-<MEDIA_PORT>-<node>/ (scope.paths)
LOG_FILE_NAME = "media_server.log"  # in LOG_DIR/media-<MEDIA_PORT>-<node>/ (scope.paths)
