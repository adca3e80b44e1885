from odpo_vllm.doctor.cli import main

raise SystemExit(main())
