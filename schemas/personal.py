"""Personal data in payloads: which fields can carry a person's words, and how an event withholds them.

A field typed ``Annotated[..., PERSONAL]`` holds free text a person wrote, or text that can quote one
(a prompt, an answer, a tool's output, a comment, a correction, an error message). Its path is found
from the models themselves (``personal_paths``), through nested parts and lists, so the schema is the one
place that says what is personal.

On the log the engine keeps those fields sealed: it takes their values out of the payload
(``withhold``), leaving each field blank (its default, or ``""`` for a required text), encrypts the
values under the key of the payload's **data subject** (``Payload.data_subject``: the field naming the
interaction the text belongs to) and carries the ciphertext in the envelope's ``sealed``. Everything
else of the payload stays readable. ``restore`` puts the values back once they are decrypted. Destroying
the subject's key leaves only the blank payload: the subject is forgotten (crypto-shredding).

This module has no cryptography: the schemas describe the wire, the engine holds the keys.
"""

from __future__ import annotations

import base64
import types
import typing
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

__all__ = [
    "PERSONAL",
    "PersonalData",
    "PersonalPath",
    "Sealed",
    "Withheld",
    "personal_paths",
    "restore",
    "subject_of",
    "withhold",
]


class PersonalData:
    """The marker ``Annotated[T, PERSONAL]`` puts on a field whose value can carry a person's words."""

    def __repr__(self) -> str:
        return "PERSONAL"


PERSONAL = PersonalData()

#: the keys from a payload down to a personal field; ``"*"`` stands for every item of a list
PersonalPath = tuple[str, ...]
#: (the concrete location of a value in the dumped payload, the value)
Withheld = list[tuple[list[str | int], Any]]

Base64 = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9+/]*={0,2}$", max_length=1_500_000)]


class Sealed(BaseModel):
    """The personal fields of an event's payload, encrypted under its data subject's key.

    ``ciphertext`` is AES-256-GCM over the JSON list of ``[location, value]`` pairs that ``withhold``
    took out, with the event id and type as associated data, so it opens only in the event it was
    sealed in."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,128}$")] = Field(
        description="the data subject's key id (the interaction the text belongs to)"
    )
    algorithm: Literal["A256GCM"] = "A256GCM"
    nonce: Base64 = Field(description="the 96-bit AES-GCM nonce, base64")
    ciphertext: Base64 = Field(description="the encrypted [location, value] pairs and the GCM tag, base64")

    @staticmethod
    def encode(data: bytes) -> str:
        return base64.b64encode(data).decode("ascii")

    @staticmethod
    def decode(text: str) -> bytes:
        return base64.b64decode(text.encode("ascii"), validate=True)


# --------------------------------------------------------------------------- which fields


def _is_personal(field: Any) -> bool:
    return any(isinstance(m, PersonalData) for m in field.metadata)


def _inner_models(annotation: Any) -> list[tuple[type[BaseModel], bool]]:
    """The models an annotation holds, each with whether it is the item type of a list."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _inner_models(typing.get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        return [m for arg in typing.get_args(annotation) for m in _inner_models(arg)]
    if origin is list:
        return [(m, True) for m, _ in _inner_models(typing.get_args(annotation)[0])]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [(annotation, False)]
    return []


_PATHS: dict[type[BaseModel], tuple[tuple[PersonalPath, Any], ...]] = {}


def personal_paths(model: type[BaseModel]) -> tuple[tuple[PersonalPath, Any], ...]:
    """(path, blank value) of every personal field of ``model``, nested parts and lists included.

    The blank is what the field holds while its value is withheld: its default, or ``""`` for a
    required text."""
    known = _PATHS.get(model)
    if known is None:
        known = _PATHS[model] = _personal_paths(model)
    return known


def _personal_paths(model: type[BaseModel]) -> tuple[tuple[PersonalPath, Any], ...]:
    out: list[tuple[PersonalPath, Any]] = []
    for name, field in model.model_fields.items():
        if _is_personal(field):
            if field.is_required():
                blank: Any = ""
            else:
                default = field.get_default(call_default_factory=True)
                blank = default.model_dump(mode="json") if isinstance(default, BaseModel) else default
            out.append(((name,), blank))
            continue
        for inner, is_list in _inner_models(field.annotation):
            prefix = (name, "*") if is_list else (name,)
            out.extend((prefix + path, blank) for path, blank in personal_paths(inner))
    return tuple(out)


def subject_of(payload: BaseModel) -> str | None:
    """The id the payload's personal fields are sealed under (``data_subject``), or None when it names none."""
    path = getattr(type(payload), "data_subject", None)
    if not path:
        return None
    node: Any = payload
    for part in path.split("."):
        node = getattr(node, part, None)
    return node if isinstance(node, str) else None


# --------------------------------------------------------------------------- withholding


def withhold(data: dict[str, Any], paths: tuple[tuple[PersonalPath, Any], ...]) -> Withheld:
    """Take the personal values out of a dumped payload (in place: each becomes its blank) and return
    them with their locations. Values that already equal their blank are left where they are."""
    taken: Withheld = []

    def take(node: Any, path: PersonalPath, i: int, at: tuple[str | int, ...], blank: Any) -> None:
        if node is None:
            return  # an optional part that is absent holds nothing
        key = path[i]
        if key == "*":
            for j, item in enumerate(node):
                take(item, path, i + 1, (*at, j), blank)
            return
        if i == len(path) - 1:
            value = node.get(key, blank)
            if value != blank:
                taken.append(([*at, key], value))
                node[key] = blank
            return
        take(node.get(key), path, i + 1, (*at, key), blank)

    for path, blank in paths:
        take(data, path, 0, (), blank)
    return taken


def restore(data: dict[str, Any], withheld: Withheld) -> dict[str, Any]:
    """Put withheld values back into a dumped payload (in place); returns it."""
    for at, value in withheld:
        node: Any = data
        for key in at[:-1]:
            node = node[key]
        node[at[-1]] = value
    return data
