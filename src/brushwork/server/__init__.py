"""The HTTP server: ``create_app(engine, settings)`` (app.py), the job queue (jobs.py), the A1111 API
(sdapi.py), the native API (api.py) and the browser UI (web/). Importing it imports no torch."""
