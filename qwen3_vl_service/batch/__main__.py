from qwen3_vl_service.batch.command import main

if __name__ == "__main__":
    raise SystemExit(main())
