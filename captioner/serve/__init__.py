"""The HTTP service (`captioner serve`): settings.py (ServeConfig: every server limit, documented once),
requests.py (an HTTP body -> items + decoding options, validated), batcher.py (the bounded queue and the
one batcher that runs the model on batches of compatible requests), metrics.py (Prometheus metrics per
app), app.py (the FastAPI app factory and a background-thread server), page.html (the web page at /).
"""

from captioner.serve.settings import ServeConfig

__all__ = ["ServeConfig", "create_app"]


def __getattr__(name):  # the app (FastAPI, uvicorn) is imported only when used: `serve` is an optional extra
    if name == "create_app":
        from captioner.serve.app import create_app

        return create_app
    raise AttributeError(name)
