"""The ``qs4d`` command line (``qs4d_np.cli.main``); one module per subcommand group."""
