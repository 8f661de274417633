"""The HTTP server: ``create_app(engine, settings)`` (app.py), the job queue (store.py) and its worker
(worker.py), the A1111 API (sdapi.py), the native API (api.py), the checks at the edge (edge.py) and the
browser UI (web/). Importing it imports no torch."""
