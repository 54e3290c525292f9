"""Is the Hugging Face hub there? Asked once per process with a short timeout: an unreachable hub then costs
seconds and one line, not huggingface_hub's own retries (a dozen warnings over ~25 s before any fallback)."""

import functools
import logging
import urllib.error
import urllib.request

log = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT_S = 3.0


@functools.lru_cache(maxsize=1)
def hub_unreachable(timeout_s: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """None when the hub answers (any HTTP status: it is there); else why not, in a few words."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:       # huggingface_hub's own switch, read from HF_HUB_OFFLINE when it loads
        return "HF_HUB_OFFLINE=1"
    request = urllib.request.Request(constants.ENDPOINT, method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s):
            return None
    except urllib.error.HTTPError:
        return None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        log.info("Hugging Face hub probe failed: %s", reason)
        return f"{constants.ENDPOINT} unreachable: {reason}"


def is_hub_id(source: str) -> bool:
    """A model source that names a hub repository, not a local folder (model.model_source resolves folders)."""
    return not source.startswith(("/", ".", "~"))


def offline_kwargs(source: str) -> dict[str, bool]:
    """from_pretrained's arguments for `source`: the local cache only when the hub is away (no retries)."""
    return {"local_files_only": True} if is_hub_id(source) and hub_unreachable() else {}
