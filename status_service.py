from qwen3_vl_service.status import main

raise SystemExit(main())
