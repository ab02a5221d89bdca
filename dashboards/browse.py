"""`sae-kit browse`: start the Streamlit feature browser on a run, sweep or SAE directory."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import tyro

from sae_kit.dashboards.workspace import ROOT_ENV
from sae_kit.errors import SaeKitError


@dataclass
class BrowseConfig:
    """Browse an SAE's features in a local Streamlit app (overview, feature list and pages, prompts, steering, compare)."""

    run: tyro.conf.Positional[Path]
    """A run directory, a sweep run directory (pick the member in the app) or an SAE directory."""
    port: int = 8501
    """Port to serve on."""
    host: str = "127.0.0.1"
    """Address to bind (127.0.0.1: this machine only; 0.0.0.0 exposes the app to the network)."""


def command(cfg: BrowseConfig) -> list[str]:
    """The streamlit command line the browser runs."""
    app = Path(__file__).with_name("app.py")
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(app),
        "--server.address",
        cfg.host,
        "--server.port",
        str(cfg.port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
        "--server.runOnSave",
        "false",
        "--global.developmentMode",
        "false",
        "--client.toolbarMode",
        "minimal",
    ]


def browse(cfg: BrowseConfig) -> None:
    """Replace this process with the Streamlit server (so its PID is the server's)."""
    if not cfg.run.exists():
        raise SaeKitError(f"{cfg.run} does not exist; pass a run directory written by sae-kit train")
    if not 0 < cfg.port < 65536:
        raise SaeKitError(f"--port must be in 1..65535, got {cfg.port}")
    print(f"sae-kit browse: serving {cfg.run} at http://{cfg.host}:{cfg.port}", flush=True)
    env = dict(os.environ, **{ROOT_ENV: str(cfg.run.resolve())})
    cmd = command(cfg)
    os.execve(cmd[0], cmd, env)
