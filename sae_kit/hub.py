"""The Hugging Face hub: SAE locations in hub repos, their download through huggingface_hub's cache, and the one home of
the hub's failure kinds (gated, not logged in, missing, offline) that models, datasets and SAEs all report.

An SAE on the hub is a folder of a model repo, as SAELens and sparsify publish them:
- SAELens-format repos (e.g. `jbloom/Gemma-2b-Residual-Stream-SAEs`): `<folder>/cfg.json` + `<folder>/sae_weights.safetensors`
  (+ `<folder>/sparsity.safetensors`); SAELens's `pretrained_saes.yaml` names the folder of each SAE as its `path`, and
  `SAE.from_pretrained(repo_id, folder)` loads a repo that is not in that list the same way;
- sparsify-format repos (e.g. `EleutherAI/sae-llama-3-8b-32x`): one folder per hook, `<layer>/cfg.json` +
  `<layer>/sae.safetensors`, beside a top-level `config.json` (the training run's); `Sae.load_from_hub(repo, hookpoint)`
  downloads `<hookpoint>/*`, and with no hookpoint needs a cfg.json at the repo root;
- sae-kit's own directories pushed to a repo (same files as SAELens's).

`fetch_sae` downloads just that folder's cfg.json and safetensors files (never a pickle, never another folder) with
`huggingface_hub.snapshot_download`, into its cache (HF_HUB_CACHE / HF_HOME), at the requested revision; with
HF_HUB_OFFLINE=1 it reads the cache alone.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

from sae_kit.errors import SaeKitError

HF_PREFIX = "hf://"
"""`load_sae("hf://owner/repo/<folder>")` (or `hf://owner/repo@<revision>/<folder>`, huggingface_hub's HfFileSystem
spelling) names a folder of a hub model repo."""
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
"""owner/name as the hub spells repo ids (huggingface_hub's validate_repo_id, with the owner required)."""
RUN_CONFIG_FILE = "config.json"
"""A sparsify run's training config, beside its layer folders (read by `sae_kit.formats` for provenance)."""
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".npz", ".npy")


class HubError(SaeKitError):
    """An SAE could not be found or downloaded on the Hugging Face hub; the message names the fix."""


# ------------------------------------------------------------------------------------------------- failure kinds
HubFailure = Literal["licence", "auth", "not_found", "offline", "other"]
"""Why a hub download failed: a gated repo whose licence is not accepted, a 401/403 (not logged in / no access), a
repo that does not exist, the hub unreachable (offline, no network, HF_HUB_OFFLINE), or anything else."""


def hub_failure(err: BaseException) -> HubFailure:
    """Classify a failed hub load from the exception chain (transformers, datasets and huggingface_hub itself wrap the
    hub's errors: a 403 with nothing cached comes back as "not in the local cache" raised from the 403, so a refusal
    anywhere in the chain wins over the cache miss that follows it)."""
    from huggingface_hub import errors as hub

    chain: list[BaseException] = []
    seen: BaseException | None = err
    while seen is not None and seen not in chain and len(chain) < 20:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    for e in chain:
        if isinstance(e, hub.GatedRepoError):
            return "licence"
    for e in chain:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if (
            isinstance(e, hub.HfHubHTTPError)
            and status in (401, 403)
            and not isinstance(e, hub.RepositoryNotFoundError)
        ):
            return "auth"
        if isinstance(e, hub.RepositoryNotFoundError):
            return "not_found"
    for e in chain:
        if isinstance(e, (hub.LocalEntryNotFoundError, hub.OfflineModeIsEnabled, ConnectionError, TimeoutError)):
            return "offline"
        if type(e).__module__.split(".")[0].startswith(("httpx", "httpcore", "requests", "urllib3")):
            return "offline"
    text = " ".join(str(e) for e in chain).lower()
    if re.search(r"\bgated\b", text):  # "gated repo", "is gated"
        return "licence"
    if "couldn't connect" in text or "couldn't reach" in text or "offline" in text:
        return "offline"
    return "other"


def hub_error_message(err: BaseException, kind: Literal["model", "dataset", "sae"], name: str) -> str:
    """One line saying why `name` (a hub model, dataset or SAE repo id) could not be loaded and what to do about it."""
    page = f"https://huggingface.co/{'datasets/' if kind == 'dataset' else ''}{name}"
    noun = "SAE repo" if kind == "sae" else kind
    local = {
        "model": "a local HF directory, or omit --model for the embedded default",
        "dataset": "a local .txt/.jsonl/.parquet file or directory, or a built-in corpus (default, fortunes, pydoc)",
        "sae": "a local SAE directory",
    }[kind]
    why = hub_failure(err)
    if why == "licence":
        return (
            f"{noun} {name!r} is gated on the Hugging Face hub: accept its licence at {page} with your account, then "
            "log in here (`hf auth login` or set HF_TOKEN)"
        )
    if why == "auth":
        return (
            f"the hub refused access to {noun} {name!r} (401/403): log in with `hf auth login` or set HF_TOKEN to a "
            f"token with access to {page}"
        )
    if why == "not_found":
        return (
            f"{noun} {name!r} does not exist on the hub (or is private): check the name at {page}, log in "
            f"(`hf auth login`) if it is private, or pass {local}"
        )
    if why == "offline":
        return (
            f"could not load {noun} {name!r}: the hub is unreachable (offline, no network or HF_HUB_OFFLINE=1) and it "
            f"is not in the local hub cache; connect once to download it, or pass {local}"
        )
    first = str(err).strip().splitlines()[0][:160] if str(err).strip() else ""
    return f"could not load {noun} {name!r} ({err.__class__.__name__}: {first}); pass {local}"


# ------------------------------------------------------------------------------------------------ SAE locations
@dataclass(frozen=True)
class HubLocation:
    """Where an SAE lives on the hub."""

    repo_id: str
    """The model repo, owner/name."""
    folder: str
    """The SAE's folder inside the repo, '/'-separated ("" for the repo root)."""
    revision: str | None
    """Branch, tag or commit to load (None: the repo's default branch, main)."""
    bare: bool = False
    """Named by a bare owner/name string that is not a local path (not hf://): errors then say no such local directory
    exists either, in case a local path was meant."""

    @property
    def name(self) -> str:
        """repo/folder as a user writes it."""
        return f"{self.repo_id}/{self.folder}" if self.folder else self.repo_id


def is_repo_id(text: str) -> bool:
    """Whether `text` is shaped like a hub repo id (owner/name, no '..' or '--' inside)."""
    return bool(_REPO_ID.match(text)) and ".." not in text and "--" not in text


def hub_location(path: str | Path, folder: str | None = None, revision: str | None = None) -> HubLocation | None:
    """The hub location `load_sae(path, folder=, revision=)` names, or None when `path` is a local path.

    Resolution: a `Path` object is always local; an `hf://owner/repo[@revision]/<folder>` string is always the hub; any
    other string is local if that path exists (an existing local path wins), else the hub if it is exactly a repo id
    (owner/name, the folder then comes from `folder=`), else local (so a missing local path that is not repo-shaped stays
    a FileNotFoundError).
    """
    if isinstance(path, str) and path.startswith(HF_PREFIX):
        return _parse_uri(path, folder, revision)
    if isinstance(path, Path) or Path(path).expanduser().exists() or not is_repo_id(path):
        if revision is not None:
            raise HubError(
                f"revision={revision!r} applies to hub repos, but {str(path)!r} is a local path; drop revision= or "
                f"name the repo as {HF_PREFIX}owner/repo/<folder>"
            )
        return None
    return HubLocation(path, _clean_folder(folder, path), revision, bare=True)


def hub_hint(path: str) -> str:
    """For a missing local path that starts like owner/repo/<folder>: how to name it as a hub SAE instead ('' else)."""
    head, _, rest = path.partition("/")
    name, _, folder = rest.partition("/")
    if folder and is_repo_id(f"{head}/{name}") and not path.startswith(("/", ".", "~")):
        return f"for the SAE in folder {folder!r} of hub repo {head}/{name}, write {HF_PREFIX}{path}"
    return ""


def _parse_uri(uri: str, folder: str | None, revision: str | None) -> HubLocation:
    body = uri[len(HF_PREFIX) :].strip("/")
    parts = body.split("/")
    if parts[0] in ("datasets", "spaces", "buckets"):
        raise HubError(f"{uri}: SAEs are loaded from model repos; write {HF_PREFIX}owner/repo/<folder>")
    if len(parts) < 2:
        raise HubError(f"{uri} names no repo; write {HF_PREFIX}owner/repo/<folder> (e.g. {HF_PREFIX}org/saes/layers.6)")
    name, _, at = parts[1].partition("@")
    repo_id = f"{parts[0]}/{name}"
    if not is_repo_id(repo_id):
        raise HubError(f"{uri}: {repo_id!r} is not a hub repo id; write {HF_PREFIX}owner/repo/<folder>")
    in_uri = "/".join(parts[2:])
    for what, given, named in (("folder", folder, in_uri), ("revision", revision, unquote(at))):
        if given is not None and named and given.strip("/") != named:
            raise HubError(f"{uri} names {what} {named!r} but {what}={given!r} was passed too; give it once")
    return HubLocation(repo_id, _clean_folder(in_uri or folder, uri), unquote(at) or revision)


def _clean_folder(folder: str | None, where: str) -> str:
    folder = (folder or "").replace("\\", "/").strip("/")
    if any(part in ("", ".", "..") for part in folder.split("/")) and folder:
        raise HubError(f"folder={folder!r} for {where}: name a folder inside the repo, e.g. 'blocks.6.hook_resid_post'")
    return folder


# ------------------------------------------------------------------------------------------------------ download
def fetch_sae(loc: HubLocation) -> tuple[Path, dict[str, Any]]:
    """(local directory of the SAE folder in the hub cache, its source record) for `loc`, downloading what is missing.

    Only `<folder>/cfg.json`, `sae_weights.safetensors`, `sae.safetensors` and `sparsity.safetensors` are fetched, plus
    the `config.json` beside the folder (a sparsify run's, which names the model and dataset). The
    source record, kept in the loaded SAE's `cfg.metadata["hub"]`, is {repo_id, folder, revision (as asked, default
    main), commit (the one loaded), uri (hf://repo@commit/folder, which reloads exactly this SAE)}. Raises HubError:
    offline with the folder not cached, repo missing, gated or refused, revision missing, folder missing (listing the
    repo's folders that hold a cfg.json, when the listing is known), or a folder with pickled weights only.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as hub

    from sae_kit.formats import SPARSIFY_WEIGHTS_FILE
    from sae_kit.sae import CFG_FILE, SPARSITY_FILE, WEIGHTS_FILE

    prefix = glob.escape(loc.folder) + "/" if loc.folder else ""
    patterns = [prefix + name for name in (CFG_FILE, WEIGHTS_FILE, SPARSIFY_WEIGHTS_FILE, SPARSITY_FILE)]
    if loc.folder:  # a sparsify run's config.json beside its layer folders: the model, dataset and context length
        parent = loc.folder.rpartition("/")[0]
        patterns.append((glob.escape(parent) + "/" if parent else "") + RUN_CONFIG_FILE)
    revision = loc.revision or constants.DEFAULT_REVISION
    try:
        snapshot = Path(snapshot_download(loc.repo_id, revision=loc.revision, allow_patterns=patterns))
    except hub.RevisionNotFoundError:
        raise HubError(
            f"SAE repo {loc.repo_id!r} has no revision {revision!r}: pass a branch, tag or commit hash that exists "
            f"(see https://huggingface.co/{loc.repo_id}/commits/main), or omit revision= for main"
        ) from None
    except Exception as err:  # noqa: BLE001  (the hub raises many types; each gets one line)
        why = hub_failure(err)
        message = (
            _offline_message(loc, revision, err) if why == "offline" else hub_error_message(err, "sae", loc.repo_id)
        )
        if loc.bare and why in ("offline", "not_found"):
            message += f" (there is no local directory {loc.repo_id!r} either)"
        raise HubError(message) from None
    local = snapshot / loc.folder if loc.folder else snapshot
    if not (local / CFG_FILE).is_file() or not any(
        (local / w).is_file() for w in (WEIGHTS_FILE, SPARSIFY_WEIGHTS_FILE)
    ):
        raise HubError(_missing_folder_message(loc, revision, snapshot))
    source = {
        "repo_id": loc.repo_id,
        "folder": loc.folder,
        "revision": revision,
        "commit": snapshot.name,
        "uri": f"{HF_PREFIX}{loc.repo_id}@{snapshot.name}" + (f"/{loc.folder}" if loc.folder else ""),
    }
    return local, source


def _offline_message(loc: HubLocation, revision: str, err: BaseException) -> str:
    from huggingface_hub import constants

    offline = constants.is_offline_mode() if hasattr(constants, "is_offline_mode") else constants.HF_HUB_OFFLINE
    what = f"SAE {loc.name!r} (revision {revision!r})"
    cache = constants.HF_HUB_CACHE
    if offline:
        return (
            f"{what} is not in the local Hugging Face cache ({cache}) and the hub is offline (HF_HUB_OFFLINE=1): "
            "run once online (unset HF_HUB_OFFLINE) to download it, point HF_HUB_CACHE at a cache that holds it, or "
            "pass a local SAE directory"
        )
    return (
        f"{what} is not in the local Hugging Face cache ({cache}) and the hub is unreachable "
        f"({err.__class__.__name__}): connect once to download it, set HF_ENDPOINT to a reachable mirror, or pass a "
        "local SAE directory"
    )


def _repo_files(repo_id: str, commit: str, snapshot: Path) -> tuple[list[str], bool]:
    """(the repo's file paths at `commit`, whether that is the whole repo) from huggingface_hub's cached tree listing
    (written by snapshot_download), else the files of the cached snapshot alone."""
    try:
        from huggingface_hub import get_cached_repo_tree  # huggingface_hub >= 1.4

        return [f.path for f in get_cached_repo_tree(repo_id, revision=commit)], True
    except Exception:  # noqa: BLE001  (older huggingface_hub, or no listing cached)
        files = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()]
        return files, False


def _missing_folder_message(loc: HubLocation, revision: str, snapshot: Path) -> str:
    """Why the snapshot holds no SAE at loc.folder: pickled weights only, or no such folder (listing those with a
    cfg.json)."""
    from sae_kit.formats import SPARSIFY_WEIGHTS_FILE
    from sae_kit.sae import CFG_FILE, WEIGHTS_FILE

    files, complete = _repo_files(loc.repo_id, snapshot.name, snapshot)
    where = f"SAE repo {loc.repo_id!r} (revision {revision!r})"
    here = loc.folder + "/" if loc.folder else ""
    inside = [f for f in files if f.startswith(here) and "/" not in f[len(here) :]]
    pickled = [f for f in inside if f.endswith(_PICKLE_SUFFIXES)]
    if pickled:
        return (
            f"{where}: {f'folder {loc.folder!r}' if loc.folder else 'the repo root'} holds no {WEIGHTS_FILE} or "
            f"{SPARSIFY_WEIGHTS_FILE}, only {', '.join(pickled[:3])}; sae-kit reads safetensors + JSON only and never "
            "unpickles: convert the weights to safetensors, or pick another folder"
        )
    if (snapshot / here / CFG_FILE).is_file():
        return (
            f"{where}: {f'folder {loc.folder!r}' if loc.folder else 'the repo root'} holds {CFG_FILE} but no "
            f"{WEIGHTS_FILE} or {SPARSIFY_WEIGHTS_FILE}; it is not an SAE folder sae-kit reads"
        )
    folders = sorted({f.rsplit("/", 1)[0] if "/" in f else "" for f in files if f.rsplit("/", 1)[-1] == CFG_FILE})
    shown = ", ".join(repr(f) if f else "'' (the repo root)" for f in folders[:20])
    if len(folders) > 20:
        shown += f", ... ({len(folders) - 20} more)"
    known = "holds" if complete else "has in the local cache"
    if not loc.folder:
        lead = f"{where} has no {CFG_FILE} at its root"
        if folders:
            return f"{lead}: it {known} {len(folders)} SAE folder(s); pass folder= one of: {shown}"
        return f"{lead} and {known} no folder with one: pass folder=<the SAE's folder in the repo>"
    lead = f"{where} has no folder {loc.folder!r} with a {CFG_FILE}"
    if folders:
        return f"{lead}; the folders that hold one are: {shown}"
    if complete:
        return f"{lead}, and no folder of it holds one: is it an SAE repo?"
    return f"{lead} in the local cache, which holds no other SAE folder of it; run once online to list the repo"
