"""References in a model request to objects the provider holds for its whole account.

A provider account is shared by every tenant of the gateway, and so is what it holds: files,
vector stores, containers, conversations, skills. Their own routes (``/v1/files``,
``/v1/vector_stores``, ...) are forwarded only when the operator lists them in the upstream's
``forward_routes`` (``gateway.proxy``). A model request can name the same objects by id, and the
provider reads them for whoever sends the id; so a reference is held to the same rule as the
route of its kind: refused with 403 ``reference_not_allowed`` (:func:`refuse`) unless the
upstream's ``forward_routes`` allows that route family.

What counts, per protocol (the ``references_*`` functions, pure, one pass over the lists that
can hold them):

- Responses: ``input_file``/``input_image`` parts with ``file_id`` (in message items, in tool
  output items, in ``prompt.variables``), a ``computer_screenshot`` with ``file_id``, and
  ``image_generation``'s ``input_image_mask.file_id`` (``files``); ``file_search`` tools'
  ``vector_store_ids`` (``vector_stores``); ``code_interpreter``'s ``container`` id
  (``containers``) or its ``file_ids`` (``files``); ``conversation`` (``conversations``); an
  ``item_reference`` item (``responses``: an item of a response stored at the provider).
- Chat Completions: ``file`` parts with ``file.file_id`` (``files``).
- Messages: ``image``/``document`` blocks whose ``source`` is of type ``file`` and
  ``container_upload`` blocks, also inside ``tool_result`` blocks (``files``); ``container``,
  an id or ``{"id": ...}`` (``containers``), and its ``custom`` skills (``skills``).

``prompt.id`` (an OpenAI prompt template) is allowed: templates are made by the operator in the
provider's dashboard, no route of the gateway creates one, and a template is configuration
shared by every tenant like the model itself (README: Responses).

A refusal names the field (by position: ``input[2].content[0].file_id``) and the
``forward_routes`` entry that would allow it, never the id.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.errors import Forbidden

if TYPE_CHECKING:
    from gateway.upstream import Upstream


@dataclass(frozen=True, slots=True)
class Reference:
    """A field of a request naming an account-wide provider object: where it is, and the
    ``forward_routes`` entry of that object's routes."""

    field: str
    family: str


WHAT = {"files": "a file", "vector_stores": "a vector store", "containers": "a container",
        "conversations": "a conversation", "skills": "a skill", "responses": "a stored response's item"}


def refuse(refs: Iterator[Reference], upstream: Upstream) -> None:
    """``Forbidden`` (403 ``reference_not_allowed``) for the first reference whose family the
    upstream's ``forward_routes`` does not allow."""
    for ref in refs:
        if not upstream.allows((ref.family,)):
            raise Forbidden(
                f"'{ref.field}' names {WHAT[ref.family]} the provider holds for its whole account, which every "
                f"tenant of this gateway could name by its id; such references are allowed only where the route "
                f"/v1/{ref.family} is. An operator can allow them by adding '{ref.family}' to forward_routes of "
                f"upstream '{upstream.name}' in the gateway configuration", code="reference_not_allowed")


def _file_part(part: Any, where: str) -> Iterator[Reference]:
    """A Responses ``input_file``/``input_image`` part, or a screenshot, that names a file."""
    if isinstance(part, dict) and part.get("file_id") is not None and part.get("type") in (
            "input_file", "input_image", "computer_screenshot"):
        yield Reference(f"{where}.file_id", "files")


def _parts(parts: Any, where: str) -> Iterator[Reference]:
    if isinstance(parts, list):
        for j, part in enumerate(parts):
            yield from _file_part(part, f"{where}[{j}]")
    else:
        yield from _file_part(parts, where)


def references_responses(body: dict[str, Any], *, conversation: bool = True) -> Iterator[Reference]:
    """A Responses request's references (see the module docstring); *conversation*: count
    ``conversation`` (False where the codec refuses it already, under gateway-held state)."""
    items = body.get("input")
    if isinstance(items, list):
        for i, item in enumerate(items):
            if not isinstance(item, dict):
                continue
            kind = item.get("type")
            if kind == "item_reference":
                yield Reference(f"input[{i}].id", "responses")
            elif isinstance(kind, str) and kind.endswith("_output"):
                yield from _parts(item.get("output"), f"input[{i}].output")
            else:
                yield from _parts(item.get("content"), f"input[{i}].content")
    prompt = body.get("prompt")
    variables = prompt.get("variables") if isinstance(prompt, dict) else None
    if isinstance(variables, dict):
        for value in variables.values():
            yield from _file_part(value, "prompt.variables")  # a variable's name is the client's: not echoed
    tools = body.get("tools")
    for k, tool in enumerate(tools if isinstance(tools, list) else ()):
        if not isinstance(tool, dict):
            continue
        if tool.get("type") == "file_search" and tool.get("vector_store_ids"):
            yield Reference(f"tools[{k}].vector_store_ids", "vector_stores")
        elif tool.get("type") == "code_interpreter":
            container = tool.get("container")
            if isinstance(container, str):
                yield Reference(f"tools[{k}].container", "containers")
            elif isinstance(container, dict) and container.get("file_ids"):
                yield Reference(f"tools[{k}].container.file_ids", "files")
        elif tool.get("type") == "image_generation":
            mask = tool.get("input_image_mask")
            if isinstance(mask, dict) and mask.get("file_id") is not None:
                yield Reference(f"tools[{k}].input_image_mask.file_id", "files")
    if conversation and body.get("conversation") is not None:
        yield Reference("conversation", "conversations")


def references_chat(body: dict[str, Any]) -> Iterator[Reference]:
    """A Chat Completions request's references: ``file`` parts naming a file by ``file_id``."""
    for i, m in enumerate(body.get("messages") or ()):
        content = m.get("content") if isinstance(m, dict) else None
        if type(content) is not list:  # most messages' content is a string: one type check each
            continue
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") == "file" and isinstance(part.get("file"), dict) \
                    and part["file"].get("file_id") is not None:
                yield Reference(f"messages[{i}].content[{j}].file.file_id", "files")


def _blocks(blocks: Any, where: str) -> Iterator[Reference]:
    """Anthropic content blocks naming a file: a ``file`` source, a ``container_upload``, and
    either inside a ``tool_result``."""
    if not isinstance(blocks, list):
        return
    for j, block in enumerate(blocks):
        if not isinstance(block, dict):
            continue
        source = block.get("source")
        if isinstance(source, dict) and source.get("type") == "file":
            yield Reference(f"{where}[{j}].source.file_id", "files")
        elif block.get("type") == "container_upload" and block.get("file_id") is not None:
            yield Reference(f"{where}[{j}].file_id", "files")
        elif block.get("type") == "tool_result":
            yield from _blocks(block.get("content"), f"{where}[{j}].content")


def references_messages(body: dict[str, Any]) -> Iterator[Reference]:
    """A Messages request's references (see the module docstring)."""
    for i, m in enumerate(body.get("messages") or ()):
        content = m.get("content") if isinstance(m, dict) else None
        if type(content) is list:
            yield from _blocks(content, f"messages[{i}].content")
    container = body.get("container")
    if isinstance(container, str):
        yield Reference("container", "containers")
    elif isinstance(container, dict):
        if container.get("id") is not None:
            yield Reference("container.id", "containers")
        skills = container.get("skills")
        for n, skill in enumerate(skills if isinstance(skills, list) else ()):
            if isinstance(skill, dict) and skill.get("type") == "custom":
                yield Reference(f"container.skills[{n}].skill_id", "skills")
