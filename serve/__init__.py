"""Ray Serve deployment of sentdisc: `serve run serve.app:build_app checkpoint=DIR classifier=FILE`."""
