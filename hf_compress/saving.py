"""Atomic ``save_pretrained`` with remote code and a model card, and ``push_to_hub`` through the same path."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any

REMOTE_CODE_FILE = "modeling_hf_compress.py"
# Files a fresh save_pretrained owns: never carried over from a previous checkpoint in the same folder.
# Weights: model[.variant][-0000k-of-0000n].safetensors, their index model.safetensors.index[.variant].json, and
# the same for pytorch_model*.bin (variant= saves put the variant there).
_OWNED = re.compile(r"^((model|pytorch_model)(\.[\w-]+?)?(-\d+-of-\d+)?\.(safetensors|bin)(\.index(\.[\w-]+)?\.json)?|"
                    r"config\.json|generation_config\.json|" + re.escape(REMOTE_CODE_FILE) + r")$")


def _own_card(folder: Path) -> bool:
    """Whether ``folder`` has no model card, or one hf_compress generated (the save then writes a fresh one; a card
    someone wrote or edited is kept, as transformers keeps it)."""
    card = folder / "README.md"
    return not card.is_file() or generated_card(card.read_text(errors="replace"))


def generated_card(text: str) -> bool:
    """Whether a model card's ``text`` is one hf_compress generated and nobody claimed: it has the marker line.
    Deleting that line keeps the card (cards written before the marker existed are kept too: delete such a
    ``README.md`` to have the next save write a fresh one)."""
    from .cards import GENERATED

    return GENERATED in text


def _remote_code(model: Any) -> tuple[str, dict[str, str]]:
    """Source of the ``trust_remote_code`` shim for ``model``'s family, and the ``auto_map`` pointing into it."""
    import transformers

    from .modeling import _MODELS, TASKS, base_model_type

    model_type = base_model_type(model.config)
    config_name = type(model.config).__name__
    auto_map = {"AutoConfig": f"{REMOTE_CODE_FILE[:-3]}.{config_name}"}
    names = [config_name]
    for auto_name, mapping in TASKS.values():
        if model_type in mapping:
            cls = _MODELS[getattr(transformers, mapping[model_type])]
            auto_map[auto_name] = f"{REMOTE_CODE_FILE[:-3]}.{cls.__name__}"
            names.append(cls.__name__)
    source = (
        '"""Loads this hf_compress checkpoint with `trust_remote_code=True` (needs `pip install hf_compress`).\n\n'
        "Written by hf_compress.save_pretrained; the compressed layers are rebuilt from config.json's\n"
        '`compression_config` and filled from the safetensors weights."""\n\n'
        "from hf_compress.modeling import (  # noqa: F401\n"
        + "".join(f"    {n},\n" for n in names)
        + ")\n"
    )
    return source, auto_map


def _swappable(target: Path) -> bool:
    """Whether an existing folder ``target`` can be replaced whole: not a mount point (cannot be renamed), not the
    current directory or one above it (the process would be left in a deleted folder), and its parent writable."""
    if not target.is_dir():
        return True
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the current directory is already gone
        cwd = None
    here = cwd is not None and (cwd == target or target in cwd.parents)
    return not (os.path.ismount(target) or here or not os.access(target.parent, os.W_OK))


def stage_directory(target: Path) -> Path:
    """A new, empty folder on ``target``'s filesystem for a save to be written into: beside ``target``, or inside
    it when ``target`` cannot be replaced whole (:func:`_swappable`). Made with the umask's mode, as any folder."""
    parent = target.parent if _swappable(target) else target
    stage = parent / f".{target.name}.hf_compress-tmp-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    return stage


def replace_directory(new: Path, target: Path) -> None:
    """Move the finished save ``new`` (from :func:`stage_directory`) to ``target``.

    Files of an old ``target`` that the save does not own (tokenizer, trainer state, user files) are kept, as hard
    links (copies across devices) in the folder that replaces it; the old folder is deleted once ``new`` is in
    place, so an interrupted save leaves it whole; the new folder takes the old one's mode and group. A folder that
    cannot be swapped (mount point, current directory, read-only parent) gets its files replaced one by one
    instead (each atomically, ``config.json`` last), then the old checkpoint's other owned files are removed.
    """
    if not target.exists():
        os.replace(new, target)
        return
    if not target.is_dir():
        raise NotADirectoryError(f"hf_compress: save path {target} exists and is not a directory.")
    if new.parent == target:
        names = [p.name for p in new.iterdir()]
        for name in names:
            if name != "config.json":
                os.replace(new / name, target / name)
        for entry in target.iterdir():  # stale weights before config.json: an interrupted save never loads them
            if entry.name not in names and _OWNED.match(entry.name) and entry.is_file():
                entry.unlink()
        if "config.json" in names:
            os.replace(new / "config.json", target / "config.json")
        return
    for entry in target.iterdir():
        if not (new / entry.name).exists() and not _OWNED.match(entry.name):
            _link_tree(entry, new / entry.name)
    shutil.copymode(target, new)
    try:
        os.chown(new, -1, target.stat().st_gid)
    except OSError:  # not allowed to give it that group: keep the default
        pass
    old = target.with_name(f".{target.name}.hf_compress-old-{uuid.uuid4().hex[:8]}")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:  # the old checkpoint back where it was
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _link_file(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _link_tree(src: Path, dst: Path) -> None:
    """``src`` (file, folder or symlink) recreated at ``dst`` with hard-linked files: no data is copied."""
    if src.is_symlink():
        os.symlink(os.readlink(src), dst)
    elif src.is_dir():
        shutil.copytree(src, dst, symlinks=True, copy_function=_link_file)
    else:
        _link_file(str(src), str(dst))


class CompressedSaveMixin:
    """``save_pretrained`` writes to a temporary sibling folder and swaps it in only when complete."""

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Like ``PreTrainedModel.save_pretrained`` (safetensors only), plus ``auto_map``, the remote-code
        shim and a model card; atomic: an interrupted save leaves any previous checkpoint intact."""
        if kwargs.pop("push_to_hub", False):
            repo_id = kwargs.pop("repo_id", None) or Path(save_directory).name
            private = kwargs.pop("private", None)
            push = {k: kwargs.pop(k) for k in ("commit_message", "commit_description", "create_pr", "revision")
                    if k in kwargs}
            self.save_pretrained(save_directory, *args, **kwargs)  # (names save_directory: it holds the model)
            if kwargs.get("is_main_process", True):  # one upload, from the process that wrote the files
                token = kwargs.get("token")
                repo_id = create_hub_repo(repo_id, private, token)  # "name" -> "user/name", as the Hub names it
                mine = _own_card(Path(save_directory)) and _hub_card(repo_id, token) is None
                if mine:  # the generated card names the repo it is pushed to
                    _write_card(self, Path(save_directory), repo_id)
                written = [p.name for p in Path(save_directory).iterdir()  # not the folder's other files, nor a
                           if _OWNED.match(p.name) or (p.name == "README.md" and mine)]  # card over the repo's own
                upload_folder(save_directory, repo_id, token=token, allow_patterns=written, **push)
                _name_pushed(self, repo_id, push)
            return
        if kwargs.pop("safe_serialization", None) is False:  # transformers 5 ignores the argument too
            warnings.warn("hf_compress: safe_serialization=False is ignored: checkpoints are safetensors only.",
                          UserWarning, stacklevel=2)
        if not kwargs.get("is_main_process", True):
            return super().save_pretrained(save_directory, *args, **kwargs)
        target = Path(save_directory).resolve()  # a symlinked folder: save into the folder it points to
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = stage_directory(target)
        try:
            source, auto_map = _remote_code(self)
            self.config.auto_map = auto_map
            cc = getattr(self.config, "compression_config", None) or {}
            if cc.get("base_model"):  # (checkpoints saved before it was recorded portably held a local path)
                from .cards import portable_base_model

                cc = self.config.compression_config = {**cc, "base_model": portable_base_model(cc["base_model"])}
            if cc.get("layers"):  # the recorded layers' specs as they are now (codebooks trained in fp32 reload so)
                from .registry import is_compressed_layer, resolve_layer_names

                now = {n: m.spec() for n, here in resolve_layer_names(self, cc["layers"]).items()
                       if is_compressed_layer(m := self.get_submodule(here))}
                self.config.compression_config = {**cc, "layers": {**cc["layers"], **now}}
            super().save_pretrained(tmp, *args, **kwargs)
            (tmp / REMOTE_CODE_FILE).write_text(source)
            own = _own_card(target)
            if not (tmp / "README.md").exists() and own:
                from .cards import model_card

                model_card(self).save(tmp / "README.md")
            elif (tmp / "README.md").exists() and not own:
                (tmp / "README.md").unlink()  # (transformers wrote one) the folder's own card is kept
            replace_directory(tmp, target)
            self.name_or_path = str(save_directory)  # what now reproduces this model (PEFT records it for adapters)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def push_to_hub(
        self, repo_id: str, private: bool | None = None, token: str | None = None, commit_message: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """Save through ``save_pretrained`` (weights, config with ``auto_map``, remote code, model card) into a
        temporary folder and upload it to ``repo_id``."""
        from huggingface_hub import ModelCard

        tags = kwargs.pop("tags", None)
        repo_id = create_hub_repo(repo_id, private, token)  # "name" -> "user/name", as the Hub names it
        before = getattr(self, "name_or_path", None)
        with tempfile.TemporaryDirectory() as tmp:
            try:
                self.save_pretrained(tmp, max_shard_size=kwargs.pop("max_shard_size", "5GB"))
            finally:
                self.name_or_path = before  # not the temporary folder, whatever happens next
            kept = _hub_card(repo_id, token)
            if kept is not None:  # the repo's own card stays (as transformers keeps it); tags are still added
                kept.save(Path(tmp) / "README.md")
            else:  # the generated card names the repo it is pushed to
                _write_card(self, Path(tmp), repo_id)
            if tags:  # the Hub reads tags from the model card's metadata
                card = ModelCard.load(Path(tmp) / "README.md")
                card.data.tags = list(dict.fromkeys([*(card.data.tags or []), *([tags] if isinstance(tags, str)
                                                                                 else tags)]))
                card.save(Path(tmp) / "README.md")
            result = upload_folder(tmp, repo_id, token=token, commit_message=commit_message, **kwargs)
        _name_pushed(self, repo_id, kwargs)
        return result


def _name_pushed(model: Any, repo_id: str, push: dict[str, Any]) -> None:
    """After a push, ``repo_id`` reproduces ``model`` (its ``name_or_path``, which PEFT records as an adapter's
    base) only if the push went to the main branch; a PR or another branch leaves the name as it was."""
    if not push.get("create_pr") and push.get("revision") in (None, "main"):
        model.name_or_path = repo_id


def _write_card(model: Any, folder: Path, repo_id: str | None) -> None:
    """(Re)write ``folder``'s generated card for ``repo_id``."""
    from .cards import model_card

    save_card(model_card(model, repo_id=repo_id), folder / "README.md")


def save_card(card: Any, path: Path) -> None:
    """Write the ``huggingface_hub.ModelCard`` ``card`` to ``path`` atomically (a temporary file renamed over it:
    an interrupted write leaves the old card)."""
    tmp = path.with_name(f".{path.name}.tmp")
    card.save(tmp)
    os.replace(tmp, path)


def _hub_card(repo_id: str, token: str | None) -> Any:
    """The model card of ``repo_id`` on the Hub if it has one that hf_compress did not generate, else ``None``."""
    from huggingface_hub import ModelCard

    try:
        card = ModelCard.load(repo_id, token=token)  # (the main branch's card)
    except Exception:  # no repo or card yet, or the Hub unreachable (httpx, OSError and Hub errors alike)
        return None
    return None if generated_card(card.content) else card


def create_hub_repo(repo_id: str, private: bool | None = None, token: str | None = None) -> str:
    """Create ``repo_id`` on the Hub if needed; returns its full id (a bare name gets the user's namespace)."""
    from huggingface_hub import HfApi

    return HfApi(token=token).create_repo(repo_id, private=private, exist_ok=True).repo_id


def upload_folder(folder: str | os.PathLike, repo_id: str, token: str | None = None,
                  commit_message: str | None = None, **kwargs: Any) -> Any:
    """Upload ``folder`` (a saved compressed model) to the existing repo ``repo_id`` (see :func:`create_hub_repo`),
    creating the branch ``revision`` first if needed, as transformers does."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    revision = kwargs.get("revision")
    if revision is not None and not str(revision).startswith("refs/pr"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id, folder_path=str(folder), commit_message=commit_message or "Upload hf_compress model", **kwargs
    )
