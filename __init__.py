"""peftlab: domain pipelines for parameter-efficient fine-tuning.

`peftlab.run(...)` trains a pipeline and returns its run directory;
`peftlab.load(run_dir)` returns a predictor over a finished run;
`peftlab.bench(pipeline, methods)` compares methods on one pipeline.
Every mistake in their input raises `peftlab.UserError`, with a one-line message.
"""

__version__ = "0.1.0"

__all__ = ["run", "load", "bench", "Predictor", "MultiAdapter", "UserError", "__version__"]


def __getattr__(name):
    # Imported lazily so `import peftlab` stays cheap (no torch until needed).
    if name in ("run", "load", "bench", "Predictor", "MultiAdapter"):
        from peftlab.pipelines import api

        return getattr(api, name)
    if name == "UserError":
        from peftlab.shared.errors import UserError

        return UserError
    raise AttributeError(f"module 'peftlab' has no attribute {name!r}")


def __dir__():
    # the lazily imported names too, so tab completion (IPython, Jupyter) offers them
    return sorted({*globals(), *__all__})
