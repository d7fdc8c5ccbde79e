"""Rule filters: the text that says which machines a work assignment rule applies to.

A filter is one line of text, for example::

    manufacturer = 'Dell Inc.' and ram >= 4GB
    mac startswith 00:C0:4F or ip = 10.1.0.0/16
    not (product contains latitude) and disk_mb > 100000

It is parsed once (mistakes are reported with their position) and then evaluated against the
facts a booting machine reports (see common.machine.MachineFacts).

Conditions
----------
A condition is ``ATTRIBUTE OPERATOR VALUE``.

ATTRIBUTE is one of (case-insensitive; aliases in brackets)::

    mac, uuid, ip, hostname, manufacturer, product [model], serial, asset_tag [assettag, asset],
    platform, arch [buildarch], ram_mb [ram, memory], disk_mb [disk], base_image

OPERATOR is one of (words are case-insensitive)::

    =           also ==, is
    !=          also <>, is not
    contains
    startswith  also starts-with, beginswith, begins-with
    endswith    also ends-with
    <  <=  >  >=

VALUE is a bare word (no spaces; letters, digits and ``. : / - _ *`` and the like) or a quoted
string in ``'`` or ``"``, where a backslash escapes the quote and the backslash itself
(``'O\\'Brien'``). Quote a value that contains spaces, quotes, parentheses or ``= < > !``, or that
is the word and, or, not.

What an operator means depends on the attribute:

* Text attributes (everything not listed below): compared case-insensitively, because SMBIOS
  strings vary in case between models. ``<``, ``<=``, ``>``, ``>=`` are not allowed.
* ram_mb and disk_mb: whole megabytes, compared as numbers with ``= != < <= > >=``. The value may
  carry a unit: ``4096``, ``4096MB``, ``4GB`` (= 4096) and ``1TB`` (= 1048576) are all accepted.
  contains/startswith/endswith are not allowed.
* mac: ``=`` and ``!=`` take a full MAC address in any spelling (``00:c0:4f:dc:2a:b5``,
  ``00-C0-4F-DC-2A-B5``, ``00c0.4fdc.2ab5``, ``00C04FDC2AB5``). contains/startswith/endswith
  compare hex digits, separators ignored: ``mac startswith 00:C0:4F`` matches a vendor (OUI).
* ip: ``=`` and ``!=`` take an address (``10.1.2.3``) or a network (``10.1.0.0/16``: is the
  machine inside it?). contains/startswith/endswith compare the written form:
  ``ip startswith 10.1.``. IPv6 addresses and networks work the same way.

Combining conditions
--------------------
``and`` (also ``&&``), ``or`` (also ``||``), ``not`` (also ``!``) and parentheses.

``and`` and ``or`` have EQUAL precedence and are applied pairwise from left to right, as the
original product documents: ``A or B and C and D`` means ``((A or B) and C) and D``. This differs
from most programming languages; use parentheses to group differently: ``A or (B and C)``.
``not`` applies to the single condition or parenthesised group right after it:
``not A and B`` is ``(not A) and B``.

An empty filter matches every machine (a catch-all rule, usually the last one).

Unknown values
--------------
A machine may not report an attribute (no disk, no SMBIOS asset tag). A condition on an
unreported attribute is false, whatever the operator: ``asset_tag != X`` is false too, because an
unknown value is not known to be different. ``not (asset_tag = X)`` is true (the plain negation
of false), so use that form to include machines that did not report the attribute.

Errors
------
A mistake raises FilterSyntaxError, whose text starts with the 0-based character position, e.g.
``at 7: expected an operator after 'ram_mb', found 'foo'`` or
``at 0: unknown attribute 'ramm' (did you mean ram_mb?)``.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Union

from common.machine import ATTRIBUTE_KINDS, AttributeKind, MachineFacts, normalize_mac

__all__ = [
    "ALIASES", "OPERATORS", "Chain", "Condition", "Filter", "FilterResult", "FilterSyntaxError",
    "Group", "Node", "Not", "parse_filter", "parse_megabytes", "quote_value",
]

# --- constants -------------------------------------------------------------------------------

ALIASES: dict[str, str] = {
    "ram": "ram_mb", "memory": "ram_mb",
    "disk": "disk_mb",
    "assettag": "asset_tag", "asset": "asset_tag",
    "buildarch": "arch",
    "model": "product",
}

# The canonical operators, in the order the documentation lists them.
OPERATORS = ("=", "!=", "contains", "startswith", "endswith", "<", "<=", ">", ">=")

_SYMBOL_OPERATORS = {"=": "=", "==": "=", "!=": "!=", "<>": "!=",
                     "<": "<", "<=": "<=", ">": ">", ">=": ">="}
_WORD_OPERATORS = {
    "is": "=",  # "is not" is handled by the parser, it is two words
    "contains": "contains",
    "startswith": "startswith", "starts-with": "startswith",
    "beginswith": "startswith", "begins-with": "startswith",
    "endswith": "endswith", "ends-with": "endswith",
}
_NUMERIC_OPERATORS = frozenset({"<", "<=", ">", ">="})
_TEXT_OPERATORS = frozenset({"contains", "startswith", "endswith"})
_CONNECTOR_WORDS = {"and": "and", "or": "or"}
_CONNECTOR_SYMBOLS = {"&&": "and", "||": "or"}
# Words that end a value position; a value spelled like one of them must be quoted.
_RESERVED_WORDS = frozenset({"and", "or", "not"})

_KIND_NOUNS = {AttributeKind.STRING: "a string", AttributeKind.NUMBER: "a number",
               AttributeKind.MAC: "a MAC address", AttributeKind.IP: "an IP address"}

# Deep nesting is never useful in a rule and would otherwise end in RecursionError.
MAX_NESTING = 50

_SPACE = re.compile(r"\s+")
_SYMBOL = re.compile(r"==|!=|<>|<=|>=|&&|\|\||[=<>!()]")
# A bare word runs up to whitespace, a parenthesis or a comparison character. A lone & or | is
# part of the word (AT&T); && and || always connect.
_WORD = re.compile(r"(?:[^\s()=<>!&|]|&(?!&)|\|(?!\|))+")
# What canonical() may leave unquoted: a subset of _WORD without quotes or backslashes, so the
# text reads back unchanged.
_SAFE_WORD = re.compile(r"[^\s()=<>!&|'\"\\]+")
_QUOTES = "'\""

_SIZE = re.compile(r"\s*([0-9]+)\s*([MmGgTt][Bb])?\s*")
_SIZE_FACTORS = {"mb": 1, "gb": 1024, "tb": 1024 * 1024}
_MAC_SEPARATORS = re.compile(r"[:\-.\s]")
_HEX = re.compile(r"[0-9A-F]+")


# --- errors ----------------------------------------------------------------------------------

class FilterSyntaxError(ValueError):
    """A filter that cannot be parsed. `position` is the 0-based offset into the text of the
    token at fault (len(text) when the text ended too early); str() is "at POSITION: MESSAGE"."""

    def __init__(self, message: str, position: int = 0):
        self.message = message
        self.position = position
        super().__init__(f"at {position}: {message}")

    def __reduce__(self):
        return (FilterSyntaxError, (self.message, self.position))


class _ConditionError(FilterSyntaxError):
    """A condition whose parts do not fit together; `part` says which token the parser should
    blame ("operator" or "value"), since Condition itself does not know positions."""

    def __init__(self, message: str, part: str):
        super().__init__(message, 0)
        self.part = part


# --- condition semantics (built once per condition, at parse time) ---------------------------

# Each builder turns (operator, value as written) into a test on a reported, non-None value.
Test = Callable[[Any], bool]


def _string_test(operator: str, value: str) -> Test:
    want = value.casefold()
    if operator == "=":
        return lambda actual: actual.casefold() == want
    if operator == "!=":
        return lambda actual: actual.casefold() != want
    if operator == "contains":
        return lambda actual: want in actual.casefold()
    if operator == "startswith":
        return lambda actual: actual.casefold().startswith(want)
    return lambda actual: actual.casefold().endswith(want)


def parse_megabytes(value: str) -> int | None:
    """'4096' / '4096MB' -> 4096, '4GB' -> 4096, '1TB' -> 1048576; None if not a size."""
    match = _SIZE.fullmatch(value)
    if match is None:
        return None
    digits, unit = match.groups()
    if len(digits) > 30:  # far beyond any disk; also keeps int() inside its digit limit
        return None
    return int(digits) * _SIZE_FACTORS[(unit or "mb").lower()]


def _number_test(operator: str, value: str) -> Test:
    want = parse_megabytes(value)
    if want is None:
        raise _ConditionError(f"'{value}' is not a whole number of MB "
                              "(write e.g. 4096, 4096MB, 4GB or 1TB)", "value")
    if operator == "=":
        return lambda actual: actual == want
    if operator == "!=":
        return lambda actual: actual != want
    if operator == "<":
        return lambda actual: actual < want
    if operator == "<=":
        return lambda actual: actual <= want
    if operator == ">":
        return lambda actual: actual > want
    return lambda actual: actual >= want


def _mac_digits(actual: str) -> str:
    # Facts normally hold the 12-digit form already; tolerate a separated spelling anyway.
    return (actual if len(actual) == 12 else _MAC_SEPARATORS.sub("", actual)).upper()


def _mac_test(operator: str, value: str) -> Test:
    if operator in ("=", "!="):
        want = normalize_mac(value)
        if want is None:
            raise _ConditionError(f"'{value}' is not a MAC address "
                                  "(12 hex digits, e.g. 00:C0:4F:DC:2A:B5)", "value")
        if operator == "=":
            return lambda actual: _mac_digits(actual) == want
        return lambda actual: _mac_digits(actual) != want
    part = _MAC_SEPARATORS.sub("", value).upper()
    if len(part) > 12 or not _HEX.fullmatch(part):
        raise _ConditionError(f"'{value}' is not part of a MAC address "
                              "(hex digits, e.g. 00:C0:4F)", "value")
    if operator == "contains":
        return lambda actual: part in _mac_digits(actual)
    if operator == "startswith":
        return lambda actual: _mac_digits(actual).startswith(part)
    return lambda actual: _mac_digits(actual).endswith(part)


def _ip_number(text: str) -> tuple[int, int] | None:
    """(IP version, address as an integer), or None if the text is not an address. IPv4 goes
    through inet_pton, ten times faster than the ipaddress module and just as strict."""
    if ":" not in text:
        try:
            return 4, int.from_bytes(socket.inet_pton(socket.AF_INET, text), "big")
        except (OSError, ValueError):
            return None
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return address.version, int(address)


def _ip_test(operator: str, value: str) -> Test:
    if operator in _TEXT_OPERATORS:
        want = value.lower()  # IPv6 hex digits may be written in either case
        if operator == "contains":
            return lambda actual: want in actual.lower()
        if operator == "startswith":
            return lambda actual: actual.lower().startswith(want)
        return lambda actual: actual.lower().endswith(want)
    try:
        if "/" in value:
            network = ipaddress.ip_network(value.strip(), strict=False)
        else:
            address = ipaddress.ip_address(value.strip())
    except ValueError:
        raise _ConditionError(f"'{value}' is not an IP address or network "
                              "(e.g. 10.1.2.3 or 10.1.0.0/16)", "value") from None
    # A reported value that is not an address is treated like an unknown one: neither = nor !=.
    if "/" in value:
        version = network.version
        low, high = int(network.network_address), int(network.broadcast_address)

        def inside(actual: str) -> bool | None:
            number = _ip_number(actual)
            if number is None:
                return None
            return number[0] == version and low <= number[1] <= high
        if operator == "=":
            return lambda actual: inside(actual) is True
        return lambda actual: inside(actual) is False
    written = str(address)  # facts hold this form, so the string compare is the fast path
    key = (address.version, int(address))
    if operator == "=":
        return lambda actual: actual == written or _ip_number(actual) == key
    return lambda actual: (actual != written and (number := _ip_number(actual)) is not None
                           and number != key)


_TEST_BUILDERS = {
    AttributeKind.STRING: _string_test,
    AttributeKind.NUMBER: _number_test,
    AttributeKind.MAC: _mac_test,
    AttributeKind.IP: _ip_test,
}


def _build_test(attribute: str, operator: str, value: str) -> Test:
    kind = ATTRIBUTE_KINDS.get(attribute)
    if kind is None:
        raise _ConditionError(f"unknown attribute '{attribute}'", "attribute")
    if operator not in OPERATORS:
        raise _ConditionError(f"unknown operator '{operator}'", "operator")
    if operator in _NUMERIC_OPERATORS and kind is not AttributeKind.NUMBER:
        raise _ConditionError(f"'{operator}' compares numbers; {attribute} is "
                              f"{_KIND_NOUNS[kind]}", "operator")
    if operator in _TEXT_OPERATORS and kind is AttributeKind.NUMBER:
        raise _ConditionError(f"'{operator}' compares text; {attribute} is a number "
                              "(use =, !=, <, <=, >, >=)", "operator")
    return _TEST_BUILDERS[kind](operator, value)


# --- the tree --------------------------------------------------------------------------------

def quote_value(value: str) -> str:
    """The value as canonical text: bare when it reads back unchanged, else single-quoted."""
    if _SAFE_WORD.fullmatch(value) and value.lower() not in _RESERVED_WORDS:
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _show_actual(actual: Any) -> str:
    if actual is None:
        return "unknown"
    if isinstance(actual, int):
        return str(actual)
    return "'" + str(actual).replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True, slots=True)
class Condition:
    """One comparison, e.g. Condition("ram_mb", ">=", "4GB"). Constructing one checks that the
    parts fit together (raises FilterSyntaxError at position 0 otherwise)."""

    attribute: str   # canonical name, a key of ATTRIBUTE_KINDS
    operator: str    # one of OPERATORS
    value: str       # as written, unquoted
    _test: Test = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_test", _build_test(self.attribute, self.operator, self.value))

    def evaluate(self, facts: MachineFacts) -> bool:
        actual = getattr(facts, self.attribute)
        return actual is not None and self._test(actual)

    def describe(self) -> str:
        return f"{self.attribute} {self.operator} {quote_value(self.value)}"

    canonical = describe

    def conditions(self) -> Iterator[Condition]:
        yield self

    def _explain(self, facts: MachineFacts, notes: list[str]) -> bool:
        result = self.evaluate(facts)
        actual = getattr(facts, self.attribute)
        notes.append(f"{self.describe()} is {'true' if result else 'false'} "
                     f"({self.attribute} is {_show_actual(actual)})")
        return result


@dataclass(frozen=True, slots=True)
class Not:
    """`not` OPERAND."""

    operand: Node

    def evaluate(self, facts: MachineFacts) -> bool:
        return not self.operand.evaluate(facts)

    def canonical(self) -> str:
        return "not " + _operand_text(self.operand)

    def conditions(self) -> Iterator[Condition]:
        return self.operand.conditions()

    def _explain(self, facts: MachineFacts, notes: list[str]) -> bool:
        return not self.operand._explain(facts, notes)


@dataclass(frozen=True, slots=True)
class Group:
    """An expression the admin wrote in parentheses; kept so canonical() keeps them."""

    inner: Node

    def evaluate(self, facts: MachineFacts) -> bool:
        return self.inner.evaluate(facts)

    def canonical(self) -> str:
        return "(" + self.inner.canonical() + ")"

    def conditions(self) -> Iterator[Condition]:
        return self.inner.conditions()

    def _explain(self, facts: MachineFacts, notes: list[str]) -> bool:
        return self.inner._explain(facts, notes)


@dataclass(frozen=True, slots=True)
class Chain:
    """FIRST (CONNECTOR OPERAND)...: operands joined by "and"/"or", applied pairwise from left
    to right (equal precedence). A flat tuple rather than nested binary nodes, so a long rule
    costs no recursion depth."""

    first: Node
    rest: tuple[tuple[str, Node], ...]  # ("and" | "or", operand)

    def evaluate(self, facts: MachineFacts) -> bool:
        result = self.first.evaluate(facts)
        for connector, operand in self.rest:
            # False and X is False, True or X is True: X need not be looked at.
            if result == (connector == "and"):
                result = operand.evaluate(facts)
        return result

    def canonical(self) -> str:
        # The first operand needs no parentheses even if it is a chain: left to right anyway.
        parts = [self.first.canonical()]
        for connector, operand in self.rest:
            parts += [connector, _operand_text(operand)]
        return " ".join(parts)

    def conditions(self) -> Iterator[Condition]:
        yield from self.first.conditions()
        for _, operand in self.rest:
            yield from operand.conditions()

    def _explain(self, facts: MachineFacts, notes: list[str]) -> bool:
        # Every condition is evaluated and reported, so the admin sees all that mattered.
        result = self.first._explain(facts, notes)
        for connector, operand in self.rest:
            value = operand._explain(facts, notes)
            result = (result and value) if connector == "and" else (result or value)
        return result


Node = Union[Condition, Not, Group, Chain]


def _operand_text(node: Node) -> str:
    # A chain can only follow a connector or `not` inside parentheses (trees built by hand).
    return "(" + node.canonical() + ")" if isinstance(node, Chain) else node.canonical()


def _compile(node: Node | None) -> Callable[[MachineFacts], bool]:
    """The tree as nested closures over local variables: evaluating 1,000 rules per request is
    dominated by attribute and method lookups, which closures avoid."""
    if node is None:
        return lambda facts: True
    if isinstance(node, Condition):
        name, test = node.attribute, node._test

        def condition(facts: MachineFacts) -> bool:
            actual = getattr(facts, name)
            return actual is not None and test(actual)
        return condition
    if isinstance(node, Group):
        return _compile(node.inner)
    if isinstance(node, Not):
        operand = _compile(node.operand)
        return lambda facts: not operand(facts)
    first = _compile(node.first)
    steps = tuple((connector == "and", _compile(operand)) for connector, operand in node.rest)
    if len(steps) == 1:  # the common two-condition rule, without the loop
        is_and, second = steps[0]
        if is_and:
            return lambda facts: first(facts) and second(facts)
        return lambda facts: first(facts) or second(facts)

    def chain(facts: MachineFacts) -> bool:
        result = first(facts)
        for is_and, operand in steps:
            if result == is_and:  # see Chain.evaluate
                result = operand(facts)
        return result
    return chain


@dataclass(frozen=True)
class FilterResult:
    matched: bool
    reason: str


@dataclass(frozen=True, slots=True)
class Filter:
    """A parsed filter; build one with parse_filter(). `root` is None for the empty filter."""

    source: str
    root: Node | None
    _evaluate: Callable[[MachineFacts], bool] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_evaluate", _compile(self.root))

    def evaluate(self, facts: MachineFacts) -> bool:
        return self._evaluate(facts)

    def explain(self, facts: MachineFacts) -> FilterResult:
        """The result plus every condition's outcome and the value it saw, in written order."""
        if self.root is None:
            return FilterResult(True, "empty filter matches every machine")
        notes: list[str] = []
        matched = self.root._explain(facts, notes)
        return FilterResult(matched, "; ".join(notes))

    def canonical(self) -> str:
        return "" if self.root is None else self.root.canonical()

    def attributes(self) -> frozenset[str]:
        return frozenset(c.attribute for c in self.conditions())

    def conditions(self) -> tuple[Condition, ...]:
        return () if self.root is None else tuple(self.root.conditions())

    def __str__(self) -> str:
        return self.canonical()


# --- text -> tree ----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _Token:
    kind: str       # "word", "quoted", "symbol" or "end"
    text: str       # as written (quoted: with its quotes)
    value: str      # word: as written; quoted: unescaped; symbol: the symbol
    position: int

    def shown(self) -> str:
        if self.kind == "end":
            return "the end of the filter"
        return self.text if self.kind == "quoted" else f"'{self.text}'"

    def word(self) -> str | None:
        return self.text.lower() if self.kind == "word" else None


def _scan_quoted(text: str, start: int) -> tuple[str, int]:
    """The unescaped value of the quoted string at `start`, and the offset after it."""
    quote = text[start]
    chars: list[str] = []
    i = start + 1
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text) and text[i + 1] in "\\'\"":
            chars.append(text[i + 1])
            i += 2
        elif char == quote:
            return "".join(chars), i + 1
        else:
            chars.append(char)
            i += 1
    raise FilterSyntaxError(f"unterminated quoted value: the {quote} here is never closed", start)


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    i = 0
    while True:
        space = _SPACE.match(text, i)
        if space:
            i = space.end()
        if i >= len(text):
            tokens.append(_Token("end", "", "", len(text)))
            return tokens
        if text[i] in _QUOTES:
            value, end = _scan_quoted(text, i)
            tokens.append(_Token("quoted", text[i:end], value, i))
        elif symbol := _SYMBOL.match(text, i):
            end = symbol.end()
            tokens.append(_Token("symbol", text[i:end], text[i:end], i))
        else:
            # Always matches: every character _SYMBOL and the checks above leave is a word one.
            end = _WORD.match(text, i).end()  # type: ignore[union-attr]
            tokens.append(_Token("word", text[i:end], text[i:end], i))
        i = end


def _connector(token: _Token) -> str | None:
    if token.kind == "symbol":
        return _CONNECTOR_SYMBOLS.get(token.text)
    return _CONNECTOR_WORDS.get(token.word() or "")


def _is_not(token: _Token) -> bool:
    return (token.kind == "symbol" and token.text == "!") or token.word() == "not"


def _resolve_attribute(token: _Token) -> str:
    name = token.text.lower()
    if name in ATTRIBUTE_KINDS:
        return name
    if name in ALIASES:
        return ALIASES[name]
    close = difflib.get_close_matches(name, [*ATTRIBUTE_KINDS, *ALIASES], n=1)
    hint = (f"did you mean {ALIASES.get(close[0], close[0])}?" if close
            else "attributes: " + ", ".join(ATTRIBUTE_KINDS))
    raise FilterSyntaxError(f"unknown attribute '{token.text}' ({hint})", token.position)


class _Parser:
    """Recursive descent over the token list:

        expression := operand (connector operand)*
        operand    := ('not' | '!') operand | '(' expression ')' | condition
        condition  := ATTRIBUTE OPERATOR VALUE
    """

    def __init__(self, text: str):
        self.tokens = _tokenize(text)
        self.index = 0
        self.depth = 0

    def peek(self) -> _Token:
        return self.tokens[self.index]

    def take(self) -> _Token:
        token = self.tokens[self.index]
        if token.kind != "end":
            self.index += 1
        return token

    def previous(self) -> str:
        return f" after {self.tokens[self.index - 1].shown()}" if self.index else ""

    def expression(self) -> Node:
        first = self.operand()
        rest: list[tuple[str, Node]] = []
        while True:
            token = self.peek()
            connector = _connector(token)
            if connector is not None:
                self.take()
                rest.append((connector, self.operand()))
            elif token.kind == "end" or (token.text == ")" and self.depth):
                return Chain(first, tuple(rest)) if rest else first
            elif token.text == ")":
                raise FilterSyntaxError("unbalanced parenthesis: this ')' has no matching '('",
                                        token.position)
            else:
                expected = "'and', 'or', ')'" if self.depth else "'and', 'or'"
                raise FilterSyntaxError(f"expected {expected} or the end of the filter"
                                        f"{self.previous()}, found {token.shown()}",
                                        token.position)

    def operand(self) -> Node:
        token = self.peek()
        if _is_not(token) or (token.text == "(" and token.kind == "symbol"):
            self.depth += 1
            if self.depth > MAX_NESTING:
                raise FilterSyntaxError(f"filter nested too deeply (more than {MAX_NESTING} "
                                        "parentheses and 'not's)", token.position)
            self.take()
            if _is_not(token):
                node: Node = Not(self.operand())
            else:
                inner = self.expression()
                if self.peek().text != ")" or self.peek().kind != "symbol":
                    raise FilterSyntaxError("unbalanced parenthesis: this '(' is never closed",
                                            token.position)
                self.take()
                node = Group(inner)
            self.depth -= 1
            return node
        if token.text == ")" and token.kind == "symbol" and not self.depth:
            raise FilterSyntaxError("unbalanced parenthesis: this ')' has no matching '('",
                                    token.position)
        if token.kind != "word" or _connector(token) is not None:
            raise FilterSyntaxError(f"expected a condition, 'not' or '('{self.previous()}, "
                                    f"found {token.shown()}", token.position)
        return self.condition()

    def condition(self) -> Condition:
        name = self.take()
        attribute = _resolve_attribute(name)
        op_token = self.take()
        operator, op_text = self.operator(op_token, name)
        value_token = self.take()
        if value_token.kind != "quoted" and (value_token.kind != "word"
                                             or value_token.word() in _RESERVED_WORDS):
            raise FilterSyntaxError(f"missing value after '{op_text}', found "
                                    f"{value_token.shown()}", value_token.position)
        try:
            return Condition(attribute, operator, value_token.value)
        except _ConditionError as error:
            blamed = op_token if error.part == "operator" else value_token
            raise FilterSyntaxError(error.message, blamed.position) from None

    def operator(self, token: _Token, name: _Token) -> tuple[str, str]:
        """(canonical operator, operator as written) for the token after an attribute."""
        if token.kind == "symbol" and token.text in _SYMBOL_OPERATORS:
            return _SYMBOL_OPERATORS[token.text], token.text
        word = token.word()
        if word == "is" and self.peek().word() == "not":
            return "!=", f"{token.text} {self.take().text}"
        if word in _WORD_OPERATORS:
            return _WORD_OPERATORS[word], token.text
        raise FilterSyntaxError(f"expected an operator after '{name.text}', found "
                                f"{token.shown()}", token.position)


def parse_filter(text: str) -> Filter:
    """Parse a rule filter (see the module documentation). Raises FilterSyntaxError."""
    if not text.strip():
        return Filter(text, None)
    return Filter(text, _Parser(text).expression())
