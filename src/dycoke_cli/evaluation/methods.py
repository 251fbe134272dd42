"""The methods a comparison or an evaluation runs: ``--methods`` parsed into choices."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import UsageError
from ..options import CompressionOptions, Method, Selection


@dataclass(frozen=True)
class MethodChoice:
    """One entry of ``--methods``: a method, or a named variant of one (``value`` names it in
    tables and JSON). ``dycoke-topk`` is DyCoke with the paper's decode-time selection, to set
    beside our default (coverage) on request."""

    value: str
    method: Method
    overrides: tuple[tuple[str, object], ...] = ()

    @classmethod
    def of(cls, method: Method) -> "MethodChoice":
        return cls(Method(method).value, Method(method))

    def options(self, base: CompressionOptions) -> CompressionOptions:
        return replace(base, method=self.method, **dict(self.overrides))


VARIANTS = {"dycoke-topk": MethodChoice("dycoke-topk", Method.dycoke, (("selection", Selection.topk),))}


def choices(methods) -> list[MethodChoice]:
    """Methods or choices -> choices (a plain Method is its own choice)."""
    return [m if isinstance(m, MethodChoice) else MethodChoice.of(m) for m in methods]


def parse_methods(text: str) -> list[MethodChoice]:
    names = [m.strip() for m in text.split(",") if m.strip()]
    valid = ", ".join([*(m.value for m in Method), *VARIANTS])
    if not names:
        raise UsageError(f"--methods is empty (choose from {valid})")
    out = []
    for name in names:
        if name in VARIANTS:
            choice = VARIANTS[name]
        else:
            try:
                choice = MethodChoice.of(Method(name))
            except ValueError:
                raise UsageError(f"--methods: unknown method {name!r} (choose from {valid})") from None
        if choice in out:
            raise UsageError(f"--methods: {name!r} is listed twice")
        out.append(choice)
    return out
