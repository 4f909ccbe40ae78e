"""Is the Hugging Face hub reachable for the ``hf://`` datasets and tokenizer a config names? Asked once, before
any process group, so an offline machine gets one message instead of a hang or a traceback on every rank.

Offline means ``HF_HUB_OFFLINE=1`` (no request is made) or the first metadata request failing at the network
level within ``timeout_s`` (DNS failure and refused connections return at once). A hub that answers but does not
know a repository (or needs a login) is named per repository.
"""

from __future__ import annotations

from dataclasses import dataclass

from mora_dist.data.sources import hub_id
from mora_dist.errors import MoRAConfigError

TIMEOUT_S = 5.0
TINY_CONFIG = "configs/remora_tiny.json"


class HubUnavailableError(MoRAConfigError):
    """The config reads from the hub and the hub cannot serve it; the message names every hub repository, the
    ``--set`` overrides for local copies, and the shipped corpus."""


@dataclass(frozen=True)
class HubRef:
    """One repository the run reads: ``kind`` is ``"dataset"`` or ``"model"`` (tokenizer); ``key`` its config key."""

    kind: str
    repo: str
    key: str
    detail: str = ""


def hub_refs(cfg) -> list[HubRef]:
    """The ``hf://`` repositories of a ``RunConfig``'s data section (sources first, then the tokenizer)."""
    refs = []
    for i, s in enumerate(cfg.data.sources):
        repo = hub_id(s.path)
        if repo is not None:
            splits = ", ".join(x for x in (s.split, s.eval_split) if x)
            detail = f"config {s.hub_config!r}, " if s.hub_config else ""
            refs.append(HubRef("dataset", repo, f"data.sources.{i}.path", f"{detail}splits {splits}"))
    repo = hub_id(cfg.data.tokenizer)
    if repo is not None:
        refs.append(HubRef("model", repo, "data.tokenizer"))
    return refs


def _offline_message(refs: list[HubRef], reason: str) -> str:
    tried = "; ".join(f"{'dataset' if r.kind == 'dataset' else 'tokenizer'} {r.repo}"
                      + (f" ({r.detail})" if r.detail else "") for r in refs)
    sets = " ".join(f"--set {r.key}=/path/to/{r.repo.rsplit('/', 1)[-1]}" for r in refs)
    return (f"the Hugging Face hub is not reachable ({reason}) and this config reads from it: {tried}. "
            f"Use local copies with {sets} (a dataset copy in the hub's layout, e.g. from `hf download "
            f"--repo-type dataset`, or a folder of .jsonl/.txt/.parquet files; a tokenizer folder or "
            f"tokenizer.json), or train on the shipped corpus: --config {TINY_CONFIG}")


def check_hub(cfg, *, timeout_s: float = TIMEOUT_S) -> None:
    """Raise :class:`HubUnavailableError` unless every ``hf://`` repository of ``cfg`` can be read now.

    Makes one metadata request per repository (none without ``hf://`` paths, none when ``HF_HUB_OFFLINE=1``).
    """
    refs = hub_refs(cfg)
    if not refs:
        return
    # only hub sources need the hub client
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:  # HF_HUB_OFFLINE as the client read it (is_offline_mode() is newer than 0.36)
        raise HubUnavailableError(_offline_message(refs, "HF_HUB_OFFLINE=1"))
    api = HfApi()
    problems = []
    for ref in refs:
        info = api.dataset_info if ref.kind == "dataset" else api.model_info
        try:
            info(ref.repo, timeout=timeout_s)
        except GatedRepoError:
            problems.append(f"{ref.key}=hf://{ref.repo} is gated: accept its terms on the hub and log in "
                            "(`hf auth login` or HF_TOKEN)")
        except RepositoryNotFoundError:
            problems.append(f"{ref.key}=hf://{ref.repo}: no such {ref.kind} on the hub (or it is private): "
                            "check the id")
        except HfHubHTTPError as exc:
            problems.append(f"{ref.key}=hf://{ref.repo}: the hub answered {exc}")
        except Exception as exc:  # transport level (DNS, refused, timeout, offline mode): the hub is out of reach
            raise HubUnavailableError(_offline_message(refs, f"{type(exc).__name__}: {exc}")) from None
    if problems:
        raise HubUnavailableError("; ".join(problems))
