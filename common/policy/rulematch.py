"""The first-match search over an ordered rule list, compiled into one Python function.

prebootpolicyd answers every booting machine by trying up to a thousand rules in order. Walking
each filter's tree costs a few microseconds per rule (a Python call per node); a whole lab
powering on at once needs better. compile_matcher() turns the list into a single function with
one `if` per rule, each attribute read and normalised once per query (casefolded, MAC digits),
IPv4 networks tested as integer ranges, and every value compared as a prepared constant, which makes a rule cost a fraction of a
microsecond.

The generated code means exactly what Filter.evaluate() means (common/policy/rules.py): unknown
values are false under every operator, and/or apply pairwise left to right (emitted with explicit
parentheses). Values never appear in the source text: each is a named constant in the function's
namespace, so no filter can inject code. What the generator does not handle inline (IP address
and network tests, very long chains) calls the filter's own compiled evaluator instead.
tests/unit/common/test_rulematch.py checks the equivalence on generated filters and machines.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any, Callable, Sequence

from common.machine import ATTRIBUTE_KINDS, AttributeKind, MachineFacts, normalize_mac

from .rules import Chain, Condition, Filter, Group, Node, Not, parse_megabytes

Matcher = Callable[[MachineFacts], int]

# Python's parser refuses very deep parentheses; longer chains fall back to the evaluator.
_MAX_CHAIN = 30
_MAX_DEPTH = 12
_MAC_SEPARATORS = str.maketrans("", "", ":-. \t\n\r\x0b\x0c")


class _Emitter:
    def __init__(self) -> None:
        self.namespace: dict[str, Any] = {"_mac_digits": _mac_digits,
                                          "_ipv4_number": _ipv4_number}
        self.attributes: set[str] = set()

    def constant(self, value: Any) -> str:
        name = f"k{len(self.namespace)}"
        self.namespace[name] = value
        return name

    def filter(self, index: int, rule: Filter) -> str:
        try:
            return self.node(rule.root, 0) if rule.root is not None else "True"
        except _TooDeep:
            return f"{self.constant(rule.evaluate)}(facts)"

    def node(self, node: Node, depth: int) -> str:
        if depth > _MAX_DEPTH:
            raise _TooDeep
        if isinstance(node, Condition):
            return self.condition(node)
        if isinstance(node, Group):
            return self.node(node.inner, depth + 1)
        if isinstance(node, Not):
            return f"(not {self.node(node.operand, depth + 1)})"
        assert isinstance(node, Chain)
        if len(node.rest) > _MAX_CHAIN:
            raise _TooDeep
        text = self.node(node.first, depth + 1)
        for connector, operand in node.rest:
            text = f"({text} {connector} {self.node(operand, depth + 1)})"
        return text

    def condition(self, condition: Condition) -> str:
        name, operator, value = condition.attribute, condition.operator, condition.value
        kind = ATTRIBUTE_KINDS[name]
        variable = f"v_{name}"
        self.attributes.add(name)
        if kind is AttributeKind.IP and operator in ("=", "!="):
            return self.ip_condition(condition, variable)
        if kind is AttributeKind.IP:
            variable, want = f"l_{name}", value.lower()
            self.attributes.add(f"lower:{name}")
        elif kind is AttributeKind.NUMBER:
            want = parse_megabytes(value)
        elif kind is AttributeKind.MAC:
            want = (normalize_mac(value) if operator in ("=", "!=")
                    else value.translate(_MAC_SEPARATORS).upper())
        else:
            want = value.casefold()
        k = self.constant(want)
        if operator == "=":
            return f"({variable} == {k})"
        if operator == "contains":
            return f"({variable} is not None and {k} in {variable})"
        if operator in ("startswith", "endswith"):
            return f"({variable} is not None and {variable}.{operator}({k}))"
        return f"({variable} is not None and {variable} {operator} {k})"

    def ip_condition(self, condition: Condition, variable: str) -> str:
        """IPv4 addresses and networks inline, as integer range checks on the address read
        once per query (n_ip); IPv6, and any fact that is not a plain IPv4 address, go
        through the evaluator's own test so the meaning cannot drift."""
        test = self.constant(condition._test)
        number = f"n_{condition.attribute}"
        self.attributes.add(f"number:{condition.attribute}")
        try:
            network = ipaddress.ip_network(condition.value.strip(), strict=False)
        except ValueError:
            network = None
        if network is None or network.version != 4:
            return f"({variable} is not None and {test}({variable}))"
        low = self.constant(int(network.network_address))
        high = self.constant(int(network.broadcast_address))
        inside = f"{low} <= {number} <= {high}"
        if condition.operator == "!=":
            inside = f"not ({inside})"
        return (f"(({inside}) if {number} is not None else "
                f"({variable} is not None and {test}({variable})))")

    def prologue(self) -> list[str]:
        lines = []
        for name in sorted(a for a in self.attributes if ":" not in a):
            kind = ATTRIBUTE_KINDS[name]
            lines.append(f"    v_{name} = facts.{name}")
            if kind is AttributeKind.STRING:
                lines.append(f"    if v_{name} is not None: v_{name} = v_{name}.casefold()")
            elif kind is AttributeKind.MAC:
                lines.append(f"    if v_{name} is not None: v_{name} = _mac_digits(v_{name})")
            if f"lower:{name}" in self.attributes:
                lines.append(f"    l_{name} = v_{name}.lower() if v_{name} is not None else None")
            if f"number:{name}" in self.attributes:
                lines.append(f"    n_{name} = _ipv4_number(v_{name}) if v_{name} is not None else None")
        return lines


class _TooDeep(Exception):
    pass


def _ipv4_number(text: str) -> int | None:
    """A dotted IPv4 address as an integer; None for anything else (IPv6, garbage)."""
    try:
        return int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
    except (OSError, ValueError):
        return None


def _mac_digits(actual: str) -> str:
    return (actual if len(actual) == 12 else actual.translate(_MAC_SEPARATORS)).upper()


def compile_matcher(filters: Sequence[Filter]) -> Matcher:
    """A function returning the index of the first filter that matches a machine, or -1."""
    emitter = _Emitter()
    body = [f"    if {emitter.filter(i, f)}: return {i}" for i, f in enumerate(filters)]
    source = "\n".join(["def match(facts):", *emitter.prologue(), *body, "    return -1", ""])
    namespace = dict(emitter.namespace)
    exec(compile(source, "<rule matcher>", "exec"), namespace)  # noqa: S102 - our own source
    return namespace["match"]
