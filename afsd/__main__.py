from afsd.cli import main

raise SystemExit(main())
