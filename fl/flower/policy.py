"""A hospital's own rules for what its node will train, and the fixed error codes its node replies with.

The hospital sets these in its SuperNode's node configuration (the server
cannot change node configuration); the pilot's ClientApp checks every
training request against them before it touches the data:

- `min-batch-size` (int): the smallest batch a local step may use (full
  batch counts as the site's training rows; under DP-SGD the expected lot,
  sample rate x rows). Batch size 1 yields per-record gradients, which
  stage 4 reconstructs exactly.
- `max-local-epochs` (int): the most passes over the data per round.
- `require-dp` (bool) and `max-epsilon` (float): only patient-level DP-SGD
  runs are accepted, and only while this site's accounted epsilon after the
  round (at the run's delta) stays at or below the maximum.
- `allowed-models` (str, comma-separated): the model kinds the hospital has
  reviewed, for example "logistic".

A request that asks for less is refused with a `PolicyRefusal`: a fixed
code the server sees (and its ledger records), with the requested and the
required setting (settings, never data).

Every other failure of the ClientApp also leaves the site as a fixed code
and a fixed sentence (`site_error`): the exception's own text, which may
name rows, values or paths, is written only to the hospital's local log
(node config `site-log`). These rules are enforced by the pinned code:
they bind a server only where the hospital runs a reviewed package
(`fl.flower.runner`).
"""
from __future__ import annotations

import json
import math
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

#: Fixed code -> the fixed sentence the server sees. Codes never change meaning.
CODES = {
    "FEDHF-POLICY-BATCH-SIZE": "the requested batch size is below this hospital's minimum",
    "FEDHF-POLICY-EPOCHS": "the requested local epochs exceed this hospital's maximum",
    "FEDHF-POLICY-DP-REQUIRED": "this hospital trains only with patient-level DP-SGD",
    "FEDHF-POLICY-EPSILON": "the round would take this hospital's epsilon above its maximum",
    "FEDHF-POLICY-MODEL": "the requested model kind is not on this hospital's list",
    "FEDHF-POLICY-CONFIG": "this hospital's node configuration is invalid",
    "FEDHF-SITE-MISMATCH": "this node's data folder is not the site it is configured as",
    "FEDHF-SITE-CONFINEMENT": "the ClientApp tried to read outside its own site's folder",
    "FEDHF-SCHEMA-MISMATCH": "the server's feature list differs from this site's",
    "FEDHF-NO-DATA": "this site has no rows in the requested split",
    "FEDHF-CLIENTAPP-ERROR": "the ClientApp failed",
    "FEDHF-FAB-NOT-PINNED": "the run's app package is not on this hospital's list of reviewed packages",
}
#: Flower's Error.code for replies carrying one of the codes above (Flower's own codes are small integers).
ERROR_CODE = 1700

POLICY_KEYS = ("min-batch-size", "max-local-epochs", "require-dp", "max-epsilon", "allowed-models")


class PolicyRefusal(RuntimeError):
    """This hospital refuses the request; `code` is one of CODES, `detail` names settings only."""

    def __init__(self, code: str, detail: str = ""):
        if code not in CODES:
            raise ValueError(f"unknown refusal code {code!r}")
        self.code, self.detail = code, detail
        super().__init__(reason(code, detail))


def reason(code: str, detail: str = "") -> str:
    """Return the text a reply with `code` carries: the code, its fixed sentence, and a settings-level detail."""
    return f"{code}: {CODES[code]}" + (f" ({detail})" if detail else "")


def code_of(text: str) -> str | None:
    """Return the FEDHF code an error text starts with, if any."""
    head = text.split(":", 1)[0].strip()
    for code in CODES:
        if code in head:
            return code
    return None


@dataclass(frozen=True)
class SitePolicy:
    """The floors one hospital sets for training on its data (None: no rule)."""

    min_batch_size: int | None = None
    max_local_epochs: int | None = None
    require_dp: bool = False
    max_epsilon: float | None = None
    allowed_models: tuple[str, ...] | None = None

    @classmethod
    def from_node_config(cls, node_config) -> "SitePolicy":
        """Return the policy in a node configuration; a bad value is refused with FEDHF-POLICY-CONFIG."""
        def number(key, kind):
            if key not in node_config:
                return None
            try:
                value = kind(node_config[key])
            except (TypeError, ValueError):
                raise PolicyRefusal("FEDHF-POLICY-CONFIG", f"{key}={node_config[key]!r} is not a number") from None
            if not math.isfinite(value) or value <= 0:
                raise PolicyRefusal("FEDHF-POLICY-CONFIG", f"{key} must be positive, got {value}")
            return value

        models = node_config.get("allowed-models")
        return cls(min_batch_size=number("min-batch-size", int), max_local_epochs=number("max-local-epochs", int),
                   require_dp=_flag(node_config.get("require-dp", False)), max_epsilon=number("max-epsilon", float),
                   allowed_models=tuple(m.strip() for m in str(models).split(",") if m.strip()) if models else None)

    def as_node_config(self) -> dict:
        """Return the node-config entries that set this policy."""
        out = {}
        if self.min_batch_size is not None:
            out["min-batch-size"] = self.min_batch_size
        if self.max_local_epochs is not None:
            out["max-local-epochs"] = self.max_local_epochs
        if self.require_dp:
            out["require-dp"] = True
        if self.max_epsilon is not None:
            out["max-epsilon"] = self.max_epsilon
        if self.allowed_models is not None:
            out["allowed-models"] = ",".join(self.allowed_models)
        return out

    def check_model(self, kind: str) -> None:
        if self.allowed_models is not None and kind not in self.allowed_models:
            raise PolicyRefusal("FEDHF-POLICY-MODEL", f"requested {kind!r}; allowed: {', '.join(self.allowed_models)}")

    def check_train(self, *, kind: str, epochs: int, batch_size: int | None, rows: int, dp=None,
                    projected_epsilon=None) -> None:
        """Raise PolicyRefusal unless a training request meets every floor.

        `batch_size` None means full batch; `dp` is the request's DPConfig (None: no DP);
        `projected_epsilon()` returns this site's epsilon after the round, computed only if needed.
        """
        self.check_model(kind)
        if dp is None and self.require_dp:
            raise PolicyRefusal("FEDHF-POLICY-DP-REQUIRED", "the request has DP-SGD off")
        local_epochs = dp.local_epochs if dp is not None else epochs
        if self.max_local_epochs is not None and local_epochs > self.max_local_epochs:
            raise PolicyRefusal("FEDHF-POLICY-EPOCHS", f"requested {local_epochs}; maximum {self.max_local_epochs}")
        if self.min_batch_size is not None:
            batch = dp.sample_rate * rows if dp is not None else (batch_size or rows)
            if batch < self.min_batch_size:
                raise PolicyRefusal("FEDHF-POLICY-BATCH-SIZE",
                                    f"requested {batch:g}{' (expected lot)' if dp is not None else ''}; "
                                    f"minimum {self.min_batch_size}")
        if dp is not None and self.max_epsilon is not None:
            epsilon = projected_epsilon()
            if not epsilon <= self.max_epsilon:
                raise PolicyRefusal("FEDHF-POLICY-EPSILON", f"epsilon after the round {epsilon:.3g} at delta "
                                    f"{dp.delta:g}; maximum {self.max_epsilon:g}")


def _flag(value) -> bool:
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "1", "yes"):
        return True
    if str(value).lower() in ("false", "0", "no", ""):
        return False
    raise PolicyRefusal("FEDHF-POLICY-CONFIG", f"require-dp={value!r} is not true or false")


def site_error(error: BaseException) -> tuple[str, str]:
    """Return (code, the reason text the server may see) for an exception raised in the ClientApp."""
    from fl.flower.isolation import SiteIsolationError

    if isinstance(error, PolicyRefusal):
        return error.code, str(error)
    if isinstance(error, SiteIsolationError):
        code = "FEDHF-SITE-MISMATCH" if "configured as site" in str(error) else "FEDHF-SITE-CONFINEMENT"
    elif isinstance(error, ValueError) and "feature list differs" in str(error):
        code = "FEDHF-SCHEMA-MISMATCH"
    elif isinstance(error, ValueError) and "has no" in str(error) and "rows" in str(error):
        code = "FEDHF-NO-DATA"
    else:
        code = "FEDHF-CLIENTAPP-ERROR"
    return code, reason(code, "details in the site's local log")


def log_locally(path: str | Path | None, event: dict) -> None:
    """Append one JSON line to the hospital's local log (nothing is written when no log is configured)."""
    if not path:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps({"time": round(time.time(), 3), **event}, default=str) + "\n")


def log_exception(path, code: str, message_type: str, error: BaseException) -> None:
    """Keep an exception's full text and traceback in the site's local log, under its fixed code."""
    log_locally(path, {"event": "clientapp-error", "code": code, "message_type": message_type,
                       "error": f"{type(error).__name__}: {error}",
                       "traceback": "".join(traceback.format_exception(error))[-4000:]})
