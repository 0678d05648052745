from qwen3_vl_service.media.server import main

if __name__ == "__main__":
    raise SystemExit(main())
