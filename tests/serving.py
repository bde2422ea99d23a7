"""Serving a built app in the test process: a free local port, gradio's launch without its start-up probe, closed
after. Every test that talks to the app over HTTP (gradio_client, chromium) starts it through `serving`."""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from bench.app_load import free_port   # the load benchmark's own; tests/test_app.py takes it from here


@contextmanager
def serving(demo, outputs: Path | None = None, **launch) -> Iterator[str]:
    """Launch `demo` (gr.Blocks) on 127.0.0.1 at a free port, `outputs` allowed for downloads; yield its URL; close it.

    `_frontend=False` skips launch's HEAD probe of the page: one try with a 3 s timeout, which a loaded machine can
    miss (the page is the config of every tab, about 1.7 MB), and launch then refuses to start ("localhost is not
    accessible"). `launch` adds launch() arguments (max_file_size, ...)."""
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                allowed_paths=[str(outputs)] if outputs is not None else None, _frontend=False, **launch)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()
