"""Loading SAEs from the Hugging Face hub, offline from a cache that huggingface_hub itself filled.

A tiny fake hub (the endpoints huggingface_hub 1.x/2.x's snapshot_download calls for a model repo: repo info at a
revision, the recursive tree listing, HEAD/GET of /resolve/) serves a SAELens-format and a sparsify-format repo written
by our own writers from a real SAE. A subprocess pointed at it (HF_ENDPOINT, a fresh HF_HOME/HF_HUB_CACHE) loads them
online, which fills the cache; the server is stopped and a second subprocess with HF_HUB_OFFLINE=1 loads them from the
cache alone. The loaded SAEs must equal the original exactly (weights and encode), and every failure is one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch

from sae_kit.hub import HubError, hub_failure, hub_location
from sae_kit.sae import SAE, SAEConfig
from sae_kit.sae_io import load_sae, save_sae

SAELENS_REPO = "sae-kit-test/smollm2-saelens"
SPARSIFY_REPO = "sae-kit-test/smollm2-sparsify"
HOOK = "blocks.6.hook_resid_post"


# ---------------------------------------------------------------------------------------------------- the fake hub
def _files(directory: Path, folder: str) -> dict[str, bytes]:
    return {f"{folder}/{p.name}": p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


class FakeHub:
    """Model repos as {repo: {"commits": {sha: {path: bytes}}, "refs": {name: sha}}}, plus refusals by repo id."""

    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}
        self.refuse = {"sae-kit-test/gated": (401, "GatedRepo"), "sae-kit-test/forbidden": (403, None)}
        self.log: list[tuple[str, str]] = []

    def add(self, repo: str, files: dict[str, bytes], ref: str = "main") -> str:
        sha = hashlib.sha1(repr(sorted((k, hashlib.sha256(v).hexdigest()) for k, v in files.items())).encode())
        commit = sha.hexdigest()
        entry = self.repos.setdefault(repo, {"commits": {}, "refs": {}})
        entry["commits"][commit] = files
        entry["refs"][ref] = commit
        return commit

    def commit(self, repo: str, rev: str) -> str | None:
        entry = self.repos[repo]
        return entry["refs"].get(rev) or (rev if rev in entry["commits"] else None)


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def error(self, status: int, code: str | None, extra: dict[str, str] | None = None) -> None:
            headers = {"X-Error-Code": code} if code else {}
            self.send(status, json.dumps({"error": code or "refused"}).encode(), {**headers, **(extra or {})})

        def route(self) -> None:
            url = urlsplit(self.path)
            parts = url.path.strip("/").split("/")
            hub.log.append((self.command, unquote(url.path)))
            api = parts[:2] == ["api", "models"]
            repo = "/".join(parts[2:4] if api else parts[:2])
            if repo in hub.refuse:
                return self.error(*hub.refuse[repo])
            if repo not in hub.repos:
                return self.error(404, "RepoNotFound")
            kind, rev, rest = (parts[4], parts[5], parts[6:]) if api else (parts[2], parts[3], parts[4:])
            commit = hub.commit(repo, unquote(rev))
            if commit is None:
                return self.error(404, "RevisionNotFound")
            files = hub.repos[repo]["commits"][commit]
            if api and kind == "revision":
                info = {"id": repo, "sha": commit, "siblings": [{"rfilename": f} for f in files]}
                return self.send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
            if api and kind == "tree":
                folders = sorted({f.rsplit("/", 1)[0] for f in files if "/" in f})
                tree = [{"type": "directory", "oid": "0" * 40, "path": d} for d in folders] + [
                    {"type": "file", "oid": hashlib.sha1(b).hexdigest(), "size": len(b), "path": f}
                    for f, b in files.items()
                ]
                return self.send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
            name = unquote("/".join(rest))
            if kind != "resolve" or name not in files:
                return self.error(404, "EntryNotFound", {"X-Repo-Commit": commit})
            body = files[name]
            etag = hashlib.sha256(body).hexdigest()
            self.send(200, body, {"X-Repo-Commit": commit, "ETag": f'"{etag}"', "Accept-Ranges": "bytes"})

        do_GET = do_HEAD = route

    return Handler


# ------------------------------------------------------------------------------------------- the loading process
LOADER = r"""
import json, sys
from pathlib import Path
from sae_kit.sae_io import load_sae, save_sae

results = {}
for case in json.loads(sys.argv[1]):
    try:
        sae = load_sae(*case["args"], **case.get("kwargs", {}))
    except Exception as err:
        results[case["name"]] = {"error": type(err).__name__, "message": str(err)}
        continue
    if case.get("save"):
        save_sae(sae, Path(case["save"]))
    results[case["name"]] = {"hub": sae.cfg.metadata.get("hub"), "d_sae": sae.cfg.d_sae, "metadata": sae.cfg.metadata}
print(json.dumps(results))
"""


def _load_in_subprocess(env: dict[str, str], cases: list[dict]) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", LOADER, json.dumps(cases)], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _hub_env(tmp: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE", "TRANSFORMERS_"))}
    env = {k: v for k, v in env.items() if k.lower() not in ("http_proxy", "https_proxy", "all_proxy")}
    return env | {
        "HF_HOME": str(tmp / "hf_home"),
        "HF_HUB_CACHE": str(tmp / "hf_cache"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
        "HF_HUB_DISABLE_XET": "1",
        "HF_HUB_ETAG_TIMEOUT": "5",
        "NO_PROXY": "127.0.0.1,localhost",
        **extra,
    }


def _tiny_sae(seed: int) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(architecture="topk", d_in=576, d_sae=64, k=4, metadata={"hook_name": HOOK}))
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    sae.set_decoder_norm_to_unit_norm()
    return sae.eval()


@pytest.fixture(scope="module")
def hub_runs(model, analysis_sae, tmp_path_factory):
    """The original SAE, real activations, the fake hub's commits, and what the online and offline loads returned."""
    from sae_kit import heldout

    tmp = tmp_path_factory.mktemp("hub")
    original = load_sae(analysis_sae / "sae")
    cfg = heldout.harvest_config_for(original)
    x, _ = heldout.activations(model, cfg, heldout.heldout_contexts(model, cfg, 512))

    written = tmp / "written"
    save_sae(original, written / "saelens", format="saelens")
    save_sae(original, written / "sparsify", format="sparsify")
    save_sae(_tiny_sae(1), written / "tiny_saelens", format="saelens")
    save_sae(_tiny_sae(2), written / "tiny_sparsify", format="sparsify")

    hub = FakeHub()
    old = hub.add(SAELENS_REPO, _files(written / "tiny_saelens", HOOK), ref="v1")
    saelens_files = {
        **_files(written / "saelens", HOOK),
        f"{HOOK}/training_state.pt": b"\x80\x04 a pickle that must never be fetched",
        "legacy/cfg.json": json.dumps(
            {**json.loads((written / "saelens" / "cfg.json").read_text()), "old": 1}
        ).encode(),
        "legacy/sae_weights.pt": b"\x80\x04 pickled weights",
        "README.md": b"# SAEs\n",
    }
    new = hub.add(SAELENS_REPO, saelens_files)
    run_config = {"model": "HuggingFaceTB/SmolLM2-135M-Instruct", "dataset": "embedded", "ctx_len": 128}
    hub.add(
        SPARSIFY_REPO,
        {
            "config.json": json.dumps(run_config).encode(),
            **_files(written / "sparsify", "layers.6"),
            **_files(written / "tiny_sparsify", "layers.3"),
        },
    )

    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        online = _load_in_subprocess(
            _hub_env(tmp, HF_ENDPOINT=endpoint),
            [
                {"name": "saelens", "args": [SAELENS_REPO], "kwargs": {"folder": HOOK}},
                {"name": "v1", "args": [SAELENS_REPO], "kwargs": {"folder": HOOK, "revision": "v1"}},
                {"name": "sparsify", "args": [f"hf://{SPARSIFY_REPO}/layers.6"]},
                {"name": "wrong_revision", "args": [SAELENS_REPO], "kwargs": {"folder": HOOK, "revision": "v9"}},
                {"name": "missing_folder", "args": [SAELENS_REPO], "kwargs": {"folder": "blocks.9.hook_resid_post"}},
                {"name": "pickle_only", "args": [f"hf://{SAELENS_REPO}/legacy"]},
                {"name": "no_repo", "args": ["sae-kit-test/no-such-repo"], "kwargs": {"folder": HOOK}},
                {"name": "gated", "args": ["sae-kit-test/gated"], "kwargs": {"folder": HOOK}},
                {"name": "forbidden", "args": ["sae-kit-test/forbidden"], "kwargs": {"folder": HOOK}},
            ],
        )
    finally:
        server.shutdown()
        server.server_close()
    fetched = sorted(path for method, path in hub.log if method == "GET" and "/resolve/" in path)
    offline = _load_in_subprocess(
        _hub_env(tmp, HF_ENDPOINT=endpoint, HF_HUB_OFFLINE="1"),
        [
            {"name": "saelens", "args": [SAELENS_REPO], "kwargs": {"folder": HOOK}, "save": str(tmp / "o_saelens")},
            {"name": "sparsify", "args": [f"hf://{SPARSIFY_REPO}/layers.6"], "save": str(tmp / "o_sparsify")},
            {"name": "v1", "args": [f"hf://{SAELENS_REPO}@v1/{HOOK}"]},
            {"name": "by_commit", "args": [online["saelens"]["hub"]["uri"] if "hub" in online["saelens"] else "x"]},
            {"name": "missing_folder", "args": [SAELENS_REPO], "kwargs": {"folder": "blocks.9.hook_resid_post"}},
            {"name": "not_downloaded", "args": [f"hf://{SPARSIFY_REPO}/layers.3"]},
            {"name": "repo_root", "args": [SPARSIFY_REPO]},
            {"name": "never_cached", "args": ["sae-kit-test/never-downloaded"], "kwargs": {"folder": HOOK}},
        ],
    )
    return {
        "original": original,
        "x": x,
        "commits": {"old": old, "new": new},
        "online": online,
        "offline": offline,
        "fetched": fetched,
        "tmp": tmp,
    }


# ---------------------------------------------------------------------------------------------------------- tests
def _assert_same_sae(loaded: SAE, original: SAE, x: torch.Tensor) -> None:
    assert loaded.cfg.d_sae == original.cfg.d_sae and loaded.cfg.k == original.cfg.k
    assert loaded.cfg.architecture == original.cfg.architecture
    for name, tensor in original.weights().items():
        assert torch.equal(loaded.weights()[name], tensor), name
    codes = original.encode(x)
    assert (codes > 0).sum(1).float().mean() > original.cfg.k / 2  # real activations light real features
    assert torch.equal(loaded.encode(x), codes)


def test_saelens_repo_loads_offline_from_the_cache_huggingface_hub_filled(hub_runs):
    new = hub_runs["commits"]["new"]
    online, offline = hub_runs["online"]["saelens"], hub_runs["offline"]["saelens"]
    source = {
        "repo_id": SAELENS_REPO,
        "folder": HOOK,
        "revision": "main",
        "commit": new,
        "uri": f"hf://{SAELENS_REPO}@{new}/{HOOK}",
    }
    assert online["hub"] == source and offline["hub"] == source
    loaded = load_sae(hub_runs["tmp"] / "o_saelens")  # what the offline process loaded, saved losslessly
    assert loaded.cfg.metadata["hub"] == source and loaded.cfg.metadata["hook_name"] == HOOK
    _assert_same_sae(loaded, hub_runs["original"], hub_runs["x"])
    cache = hub_runs["tmp"] / "hf_cache" / f"models--{SAELENS_REPO.replace('/', '--')}"
    assert (cache / "refs" / "main").read_text() == new  # huggingface_hub's own layout: refs, snapshots, blobs
    snapshot = cache / "snapshots" / new / HOOK
    assert (snapshot / "sae_weights.safetensors").is_symlink() and (snapshot / "cfg.json").is_file()


def test_sparsify_repo_loads_offline_with_its_run_config(hub_runs):
    offline = hub_runs["offline"]["sparsify"]
    assert offline["hub"]["repo_id"] == SPARSIFY_REPO and offline["hub"]["folder"] == "layers.6"
    assert offline["hub"] == hub_runs["online"]["sparsify"]["hub"]
    loaded = load_sae(hub_runs["tmp"] / "o_sparsify")
    # the layer folder names the hook; the top-level config.json (fetched beside it) names the model and context
    assert loaded.cfg.metadata["hook_name"] == HOOK and loaded.cfg.metadata["context_size"] == 128
    assert loaded.cfg.metadata["model_name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    _assert_same_sae(loaded, hub_runs["original"], hub_runs["x"])


def test_only_the_folders_json_and_safetensors_are_downloaded(hub_runs):
    new, old = hub_runs["commits"]["new"], hub_runs["commits"]["old"]
    assert hub_runs["fetched"] == sorted(
        [
            f"/{SAELENS_REPO}/resolve/{new}/{HOOK}/cfg.json",
            f"/{SAELENS_REPO}/resolve/{new}/{HOOK}/sae_weights.safetensors",
            f"/{SAELENS_REPO}/resolve/{new}/{HOOK}/sparsity.safetensors",
            f"/{SAELENS_REPO}/resolve/{new}/legacy/cfg.json",  # the pickle-only folder: its cfg.json, never its .pt
            f"/{SAELENS_REPO}/resolve/{old}/{HOOK}/cfg.json",
            f"/{SAELENS_REPO}/resolve/{old}/{HOOK}/sae_weights.safetensors",
            *(
                f"/{SPARSIFY_REPO}/resolve/{hub_runs['offline']['sparsify']['hub']['commit']}/{f}"
                for f in ("config.json", "layers.6/cfg.json", "layers.6/sae.safetensors")
            ),
        ]
    )
    assert hub_runs["original"].sparsity is not None  # so sparsity.safetensors above was really written and fetched


def test_revision_is_honoured_online_and_offline(hub_runs):
    old = hub_runs["commits"]["old"]
    for run in ("online", "offline"):
        v1 = hub_runs[run]["v1"]
        assert v1["d_sae"] == 64 and v1["hub"]["commit"] == old and v1["hub"]["revision"] == "v1", run
    by_commit = hub_runs["offline"]["by_commit"]  # the recorded uri reloads that exact commit, offline
    assert by_commit["hub"]["commit"] == hub_runs["commits"]["new"] and by_commit["d_sae"] == 4608
    wrong = hub_runs["online"]["wrong_revision"]
    assert wrong["error"] == "HubError" and "\n" not in wrong["message"]
    assert f"{SAELENS_REPO!r} has no revision 'v9'" in wrong["message"] and "omit revision=" in wrong["message"]


def test_missing_folder_lists_the_folders_that_hold_a_cfg_json(hub_runs):
    for run in ("online", "offline"):  # offline: from the tree listing huggingface_hub cached
        err = hub_runs[run]["missing_folder"]
        assert err["error"] == "HubError" and "\n" not in err["message"], run
        assert "no folder 'blocks.9.hook_resid_post'" in err["message"], run
        assert "the folders that hold one are: 'blocks.6.hook_resid_post', 'legacy'" in err["message"], run
    root = hub_runs["offline"]["repo_root"]
    assert (
        "no cfg.json at its root" in root["message"]
        and "pass folder= one of: 'layers.3', 'layers.6'" in root["message"]
    )
    pickled = hub_runs["online"]["pickle_only"]
    assert pickled["error"] == "HubError" and "only legacy/sae_weights.pt" in pickled["message"]
    assert "never unpickles" in pickled["message"]


def test_offline_with_nothing_cached_says_how_to_fix_it(hub_runs):
    for name, what in (
        ("never_cached", f"'sae-kit-test/never-downloaded/{HOOK}'"),
        ("not_downloaded", f"'{SPARSIFY_REPO}/layers.3'"),  # in the repo, but this folder was never fetched
    ):
        err = hub_runs["offline"][name]
        assert err["error"] == "HubError" and "\n" not in err["message"], name
        assert err["message"].startswith(f"SAE {what} (revision 'main') is not in the local Hugging Face cache"), name
        assert "the hub is offline (HF_HUB_OFFLINE=1): run once online" in err["message"], name
    never, folder = hub_runs["offline"]["never_cached"]["message"], hub_runs["offline"]["not_downloaded"]["message"]
    assert never.endswith("(there is no local directory 'sae-kit-test/never-downloaded' either)")
    assert "no local directory" not in folder  # hf:// cannot have meant a local path


def test_hub_refusals_name_the_fix(hub_runs):
    online = hub_runs["online"]
    for name in ("no_repo", "gated", "forbidden"):
        assert online[name]["error"] == "HubError" and "\n" not in online[name]["message"], name
    assert "'sae-kit-test/no-such-repo' does not exist on the hub" in online["no_repo"]["message"]
    assert "(there is no local directory 'sae-kit-test/no-such-repo' either)" in online["no_repo"]["message"]
    assert (
        "is gated on the Hugging Face hub: accept its licence at https://huggingface.co/sae-kit-test/gated"
        in (online["gated"]["message"])
    )
    assert (
        "refused access to SAE repo 'sae-kit-test/forbidden' (401/403): log in with `hf auth login`"
        in (online["forbidden"]["message"])
    )


# ------------------------------------------------------------------------------------------ how a string resolves
def test_an_existing_local_path_wins_over_a_repo_id(tmp_path, monkeypatch):
    sae = _tiny_sae(3)
    save_sae(sae, tmp_path / "owner" / "repo" / HOOK)
    monkeypatch.chdir(tmp_path)
    loaded = load_sae("owner/repo", folder=HOOK)  # a local directory owner/repo exists: no hub call
    assert "hub" not in loaded.cfg.metadata and torch.equal(loaded.W_dec, sae.W_dec)
    assert hub_location("owner/repo") is None and hub_location(Path("elsewhere/repo")) is None
    assert hub_location("elsewhere/repo") is not None  # missing and repo-shaped: the hub
    with pytest.raises(FileNotFoundError, match="hf://elsewhere/repo/x"):
        load_sae("elsewhere/repo/x")  # missing and not a repo id: a local path (the hub spelling is hinted)
    with pytest.raises(FileNotFoundError):
        load_sae(Path("elsewhere/repo"))  # a Path is never a repo id
    with pytest.raises(HubError, match="applies to hub repos, but .owner.repo. is a local path"):
        load_sae("owner/repo", revision="v1")


def test_hub_locations_parse_and_bad_ones_are_one_line():
    loc = hub_location("hf://org/saes@refs%2Fpr%2F1/layer_6/width_16k")
    assert (loc.repo_id, loc.folder, loc.revision) == ("org/saes", "layer_6/width_16k", "refs/pr/1")
    loc = hub_location("org/saes", folder="/blocks.6.hook_resid_post/", revision="v2")
    assert (loc.repo_id, loc.folder, loc.revision) == ("org/saes", "blocks.6.hook_resid_post", "v2")
    assert hub_location("hf://org/saes", folder="layers.6").folder == "layers.6"
    for uri, kwargs, message in (
        ("hf://org", {}, "names no repo"),
        ("hf://datasets/org/data", {}, "model repos"),
        ("hf://org/saes/a", {"folder": "b"}, "names folder 'a' but folder='b'"),
        ("hf://org/saes@v1/a", {"revision": "v2"}, "names revision 'v1' but revision='v2'"),
        ("org/saes", {"folder": "../up"}, "name a folder inside the repo"),
    ):
        with pytest.raises(HubError, match=message) as err:
            hub_location(uri, **kwargs)
        assert "\n" not in str(err.value)


def test_a_refusal_wins_over_the_cache_miss_huggingface_hub_raises_from_it():
    from types import SimpleNamespace

    from huggingface_hub import errors

    refused = errors.HfHubHTTPError(
        "403 Forbidden", response=SimpleNamespace(status_code=403, headers={}, request=None)
    )
    try:
        try:
            raise refused
        except errors.HfHubHTTPError as inner:
            raise errors.LocalEntryNotFoundError("not in the cache") from inner
    except errors.LocalEntryNotFoundError as err:
        assert hub_failure(err) == "auth"
    assert hub_failure(errors.LocalEntryNotFoundError("not in the cache")) == "offline"
