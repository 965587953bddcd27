"""OpenAI's strict mode (`strict: true` on a function or a json_schema): the output follows the
schema exactly, so an object has every key of its `properties` and no other. OpenAI requires
such schemas to say `additionalProperties: false` and to list every property in `required` on
every object; here an object that says nothing is closed and fully required, and one that
allows more keys or leaves a property out of its `required` is refused (as OpenAI refuses it).
Optional fields are written as OpenAI documents: a union with null."""

from __future__ import annotations

from typing import Any

# Keywords whose value is a schema, a list of schemas, or a map of name -> schema.
_ONE = ("items", "additionalItems", "not", "if", "then", "else", "contains", "propertyNames")
_MANY = ("anyOf", "oneOf", "allOf", "prefixItems")  # (`items` in _ONE: a schema or a list)
_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def _is_object(schema: dict[str, Any]) -> bool:
    kind = schema.get("type")
    return (
        kind == "object" or (isinstance(kind, list) and "object" in kind) or "properties" in schema
    )


def closed(schema: Any) -> Any:
    """A copy of `schema` in which every object schema without `additionalProperties` has it
    false and every one without `required` requires all its properties (nested objects, array
    items, alternatives and definitions included)."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _ONE + _MANY:
        if key in out:
            out[key] = closed(out[key])
    for key in _MAP:
        if isinstance(out.get(key), dict):
            out[key] = {name: closed(s) for name, s in out[key].items()}
    if _is_object(out) and "additionalProperties" not in out:
        out["additionalProperties"] = False
    if _is_object(out) and "required" not in out and isinstance(out.get("properties"), dict):
        out["required"] = list(out["properties"])
    return out


def strict_error(schema: Any, at: str = "") -> str | None:
    """Where a strict schema lets an object take more keys or leave a property out (None:
    nowhere)."""
    if isinstance(schema, list):
        for i, s in enumerate(schema):
            if (err := strict_error(s, f"{at}[{i}]")) is not None:
                return err
        return None
    if not isinstance(schema, dict):
        return None
    extra = schema.get("additionalProperties", False)
    if _is_object(schema) and extra is not False:
        return f"{at or 'the schema'}: strict mode needs additionalProperties: false"
    if (missing := _not_required(schema)) is not None:
        return (
            f"{at or 'the schema'}: strict mode needs every property in 'required' "
            f"(missing '{missing}'; make an optional field a union with null)"
        )
    for key in _ONE + _MANY:
        if key in schema and (err := strict_error(schema[key], f"{at}.{key}")) is not None:
            return err
    for key in _MAP:
        for name, s in (schema.get(key) or {}).items() if isinstance(schema.get(key), dict) else ():
            if (err := strict_error(s, f"{at}.{key}.{name}")) is not None:
                return err
    return None


def _not_required(schema: dict[str, Any]) -> str | None:
    """A property that a `required` list leaves out (None: none, or no list to check)."""
    required, props = schema.get("required"), schema.get("properties")
    if not isinstance(required, list) or not isinstance(props, dict):
        return None
    return next((str(name)[:64] for name in props if name not in required), None)
