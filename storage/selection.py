"""Label selectors, field selectors and the SelectionPredicate, with Kubernetes grammar and semantics.

Mirrors k8s.io/apimachinery ``pkg/labels/selector.go`` (label selector grammar, lexer, Requirement),
``pkg/fields/selector.go`` (field selector grammar and value escaping) and k8s.io/apiserver
``pkg/storage/selection_predicate.go`` (SelectionPredicate).

Every malformed selector raises :class:`storage.errors.BadRequestError` (HTTP 400) whose message quotes
the selector and names the offending part.

``matches`` runs once per event per watcher in the watch cache, so selectors are compiled when built:
requirements become flat tuples of ``(kind, key, argument)`` with frozensets for set operators, and the
two most common shapes (no requirement, one equality) get dedicated classes whose ``matches`` is a
single lookup.

Deliberate difference from Kubernetes: a label selector containing a NUL character is rejected. The Go
lexer uses byte 0 as its end-of-input sentinel, so Kubernetes silently ignores everything after a NUL
(``"\\x00app=web"`` selects everything); refusing it is safer than widening a client's selection.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Iterable, Mapping

from storage.errors import BadRequestError

__all__ = [
    "EVERYTHING_FIELDS", "EVERYTHING_LABELS", "FieldRequirement", "FieldSelector", "LabelSelector",
    "Operator", "Requirement", "SelectionPredicate", "escape_field_value", "everything_fields",
    "everything_labels", "field_selector_from_set", "label_selector_from_set", "parse_field_selector",
    "parse_label_selector", "unescape_field_value",
]


class Operator(str, enum.Enum):
    """Selector operators; the values are apimachinery ``pkg/selection`` Operator strings."""

    DOES_NOT_EXIST = "!"
    EQUALS = "="
    DOUBLE_EQUALS = "=="
    IN = "in"
    NOT_EQUALS = "!="
    NOT_IN = "notin"
    EXISTS = "exists"
    GREATER_THAN = "gt"
    LESS_THAN = "lt"

    def __str__(self) -> str:
        return self.value


_SET_OPERATORS = frozenset({Operator.IN, Operator.NOT_IN})
_EXACT_OPERATORS = frozenset({Operator.EQUALS, Operator.DOUBLE_EQUALS, Operator.NOT_EQUALS})
_UNARY_OPERATORS = frozenset({Operator.EXISTS, Operator.DOES_NOT_EXIST})
_RANGE_OPERATORS = frozenset({Operator.GREATER_THAN, Operator.LESS_THAN})

# --------------------------------------------------------------------------------------------------
# Validation (apimachinery pkg/api/validate/content: IsLabelKey, IsLabelValue, IsDNS1123Subdomain)
# --------------------------------------------------------------------------------------------------

_NAME_RE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS1123_SUBDOMAIN_RE = re.compile(_DNS1123_LABEL + r"(\." + _DNS1123_LABEL + r")*")
_NAME_MAX, _PREFIX_MAX, _VALUE_MAX = 63, 253, 63
_NAME_RULE = ("must consist of alphanumeric characters, '-', '_' or '.', "
              "and must start and end with an alphanumeric character")
# strconv.ParseInt(s, 10, 64): optional sign, ASCII digits only, no underscores, int64 range.
_INT_RE = re.compile(r"[+-]?[0-9]+")
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1


def _label_key_errors(key: str) -> list[str]:
    """Problems with ``key`` as a label key (qualified name), empty when valid."""
    parts = key.split("/")
    if len(parts) > 2:
        return ["a label key is an optional DNS subdomain prefix and '/' followed by a name"]
    errors = []
    if len(parts) == 2:
        errors += _prefix_errors(parts[0])
    name = parts[-1]
    if not name:
        errors.append("name part must be non-empty")
        return errors
    if len(name) > _NAME_MAX:
        errors.append(f"name part must be no more than {_NAME_MAX} characters")
    if _NAME_RE.fullmatch(name) is None:
        errors.append("name part " + _NAME_RULE)
    return errors


def _prefix_errors(prefix: str) -> list[str]:
    if not prefix:
        return ["prefix part must be non-empty"]
    errors = []
    if len(prefix) > _PREFIX_MAX:
        errors.append(f"prefix part must be no more than {_PREFIX_MAX} characters")
    if _DNS1123_SUBDOMAIN_RE.fullmatch(prefix) is None:
        errors.append("prefix part must be a lowercase RFC 1123 subdomain (e.g. 'example.com')")
    return errors


def _label_value_errors(value: str) -> list[str]:
    """Problems with ``value`` as a label value (empty is valid), empty when valid."""
    errors = []
    if len(value) > _VALUE_MAX:
        errors.append(f"must be no more than {_VALUE_MAX} characters")
    if value and _NAME_RE.fullmatch(value) is None:
        errors.append("a valid label value must be empty or " + _NAME_RULE)
    return errors


def _parse_int64(text: str) -> int | None:
    """``text`` as Go's strconv.ParseInt(text, 10, 64) reads it, or None where that fails."""
    if _INT_RE.fullmatch(text) is None:
        return None
    number = int(text)
    return number if _INT64_MIN <= number <= _INT64_MAX else None


# --------------------------------------------------------------------------------------------------
# Label requirements and selectors
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Requirement:
    """One label requirement: ``key``, ``operator`` and ``values`` (a sorted tuple without duplicates).

    Mirrors apimachinery pkg/labels/selector.go ``Requirement`` and ``NewRequirement``. Construction
    validates and raises BadRequestError when the key is not a qualified name, a value is not a label
    value, the value count does not fit the operator (exactly one for =, ==, !=, >, <; at least one for
    in/notin; none for exists and !) or a > / < value is not a base-10 int64. ``operator`` may be given
    as an :class:`Operator` or its string value; it is stored as an Operator.
    """

    key: str
    operator: Operator
    values: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.values, str):
            raise TypeError("Requirement values must be a tuple of strings, not a string")
        operator = _as_operator(self.operator)
        _check_requirement(self.key, operator, tuple(self.values))
        object.__setattr__(self, "operator", operator)
        object.__setattr__(self, "values", tuple(sorted(set(self.values))))

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether ``labels`` satisfy this requirement (Requirement.Matches).

        A missing key fails =, ==, in, exists, > and <, and passes !=, notin and !. For > and < the
        label value must itself parse as an int64, or the requirement fails. Builds a one-requirement
        selector per call: for repeated matching, build a LabelSelector once.
        """
        return LabelSelector((self,)).matches(labels)

    def __str__(self) -> str:
        """Kubernetes' Requirement.String(): ``!k``, ``k``, ``k=v``, ``k in (a,b)``, ``k>3``, ..."""
        op = self.operator
        if op is Operator.EXISTS:
            return self.key
        if op is Operator.DOES_NOT_EXIST:
            return "!" + self.key
        joined = ",".join(self.values)
        if op in _SET_OPERATORS:
            return f"{self.key} {op.value} ({joined})"
        return f"{self.key}{_RANGE_SYMBOL.get(op, op.value)}{joined}"


_RANGE_SYMBOL = {Operator.GREATER_THAN: ">", Operator.LESS_THAN: "<"}


def _as_operator(operator: Operator | str) -> Operator:
    try:
        return Operator(operator)
    except ValueError:
        raise BadRequestError(f"unsupported label selector operator {operator!r}") from None


def _check_requirement(key: str, operator: Operator, values: tuple[str, ...]) -> None:
    """Raise BadRequestError unless (key, operator, values) would pass NewRequirement."""
    problems = []
    key_errors = _label_key_errors(key)
    if key_errors:
        problems.append(f"key {key!r}: " + "; ".join(key_errors))
    problems += _value_count_problems(key, operator, values)
    for value in values:
        errs = _label_value_errors(value)
        if errs:
            problems.append(f"value {value!r} for key {key!r}: " + "; ".join(errs))
    if problems:
        raise BadRequestError("invalid label requirement: " + "; ".join(problems))


def _value_count_problems(key: str, operator: Operator, values: tuple[str, ...]) -> list[str]:
    if operator in _SET_OPERATORS and not values:
        return ["values set can't be empty for 'in' and 'notin'"]
    if operator in _EXACT_OPERATORS and len(values) != 1:
        return [f"operator {operator.value!r} requires exactly one value"]
    if operator in _UNARY_OPERATORS and values:
        return ["values set must be empty for exists and does not exist"]
    if operator in _RANGE_OPERATORS:
        if len(values) != 1:
            return ["'>' and '<' require exactly one value"]
        if _parse_int64(values[0]) is None:
            return [f"value {values[0]!r} for key {key!r}: '>' and '<' require a base-10 64-bit integer"]
    return []


# Match kinds, numbered in the order the matching loop tests them (most frequent first).
_EQ, _NE, _IN, _NOTIN, _EXISTS, _ABSENT, _GT, _LT = range(8)


def _compile(req: Requirement) -> tuple[int, str, object]:
    """Reduce ``req`` to ``(kind, key, argument)`` for the matching loop.

    Single-value in/notin become plain (in)equality: for a str value ``labels.get(key) == v`` already
    means "present and equal", and ``!=`` means "absent or different", which is the notin semantics.
    """
    op, key, values = req.operator, req.key, req.values
    if op in (Operator.EQUALS, Operator.DOUBLE_EQUALS) or (op is Operator.IN and len(values) == 1):
        return (_EQ, key, values[0])
    if op is Operator.NOT_EQUALS or (op is Operator.NOT_IN and len(values) == 1):
        return (_NE, key, values[0])
    if op in _SET_OPERATORS:
        return (_IN if op is Operator.IN else _NOTIN, key, frozenset(values))
    if op in _RANGE_OPERATORS:
        return (_GT if op is Operator.GREATER_THAN else _LT, key, _parse_int64(values[0]))
    return (_EXISTS if op is Operator.EXISTS else _ABSENT, key, None)


def _range_matches(kind: int, bound: int, value: str | None) -> bool:
    if value is None:
        return False
    number = _parse_int64(value)
    if number is None:
        return False
    return number > bound if kind == _GT else number < bound


class LabelSelector:
    """An immutable, parsed label selector: the AND of its requirements.

    Mirrors apimachinery pkg/labels/selector.go ``internalSelector``. Build one with
    :func:`parse_label_selector`, :func:`label_selector_from_set`, or ``LabelSelector(requirements)``
    with an iterable of :class:`Requirement`. Requirements are kept sorted by key (stably, so repeated
    keys keep their order), which makes ``str()`` canonical. Selectors compare and hash by their
    requirements. The constructor may return a private subclass specialised for the selector's shape.
    """

    __slots__ = ("_requirements", "_checks", "_string")

    def __new__(cls, requirements: Iterable[Requirement] = ()) -> LabelSelector:
        reqs = tuple(requirements)
        for req in reqs:
            if not isinstance(req, Requirement):
                raise TypeError(f"expected Requirement, got {type(req).__name__}")
        reqs = tuple(sorted(reqs, key=_requirement_key))
        checks = tuple(sorted((_compile(r) for r in reqs), key=_check_kind))
        self = object.__new__(_label_selector_class(checks))
        object.__setattr__(self, "_requirements", reqs)
        object.__setattr__(self, "_checks", checks)
        object.__setattr__(self, "_string", ",".join(str(r) for r in reqs))
        self._specialise()
        return self

    def _specialise(self) -> None:
        """Hook for shape-specific subclasses to precompute their fast-path state."""

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether ``labels`` (label name -> value) satisfy every requirement (Selector.Matches)."""
        get = labels.get
        for kind, key, arg in self._checks:
            if kind == _EQ:
                if get(key) != arg:
                    return False
            elif kind == _NE:
                if get(key) == arg:
                    return False
            elif kind == _IN:
                if get(key) not in arg:
                    return False
            elif kind == _NOTIN:
                if get(key) in arg:
                    return False
            elif kind == _EXISTS:
                if key not in labels:
                    return False
            elif kind == _ABSENT:
                if key in labels:
                    return False
            elif not _range_matches(kind, arg, get(key)):
                return False
        return True

    @property
    def empty(self) -> bool:
        """True when the selector has no requirements and so matches everything (Selector.Empty)."""
        return not self._requirements

    @property
    def requirements(self) -> tuple[Requirement, ...]:
        """The requirements, sorted by key."""
        return self._requirements

    def exact_value(self, key: str) -> str | None:
        """The value ``key`` must equal, or None (Selector.RequiresExactMatch).

        As in Kubernetes, the first requirement on ``key`` decides: it pins the key only when it is
        =, == or in with a single value. The returned value may be "" (e.g. ``app=``).
        """
        for req in self._requirements:
            if req.key == key:
                pinned = req.operator in (Operator.EQUALS, Operator.DOUBLE_EQUALS, Operator.IN)
                return req.values[0] if pinned and len(req.values) == 1 else None
        return None

    def __str__(self) -> str:
        """Canonical form (Selector.String()): requirement strings in key order, joined by ","."""
        return self._string

    def __repr__(self) -> str:
        return f"LabelSelector({self._string!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LabelSelector):
            return NotImplemented
        return self._requirements == other._requirements

    def __hash__(self) -> int:
        return hash(self._requirements)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __reduce__(self) -> tuple[type, tuple[tuple[Requirement, ...]]]:
        # __new__ needs the requirements; the default slot-state pickling would bypass it.
        return (LabelSelector, (self._requirements,))


def _requirement_key(req: Requirement) -> str:
    return req.key


def _check_kind(check: tuple[int, str, object]) -> int:
    return check[0]


class _MatchAllLabels(LabelSelector):
    """The empty label selector (labels.Everything())."""

    __slots__ = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Always True."""
        return True


class _OneEqualLabel(LabelSelector):
    """A selector that is a single equality, e.g. ``app=web``: the most common shape by far."""

    __slots__ = ("_key", "_value")

    def _specialise(self) -> None:
        _, key, value = self._checks[0]
        object.__setattr__(self, "_key", key)
        object.__setattr__(self, "_value", value)

    def matches(self, labels: Mapping[str, str]) -> bool:
        """True when the label is present and equal to the pinned value."""
        return labels.get(self._key) == self._value


def _label_selector_class(checks: tuple[tuple[int, str, object], ...]) -> type[LabelSelector]:
    if not checks:
        return _MatchAllLabels
    if len(checks) == 1 and checks[0][0] == _EQ:
        return _OneEqualLabel
    return LabelSelector


# --------------------------------------------------------------------------------------------------
# Label selector lexer and parser (apimachinery pkg/labels/selector.go Lexer, Parser, Parse)
# --------------------------------------------------------------------------------------------------

_T_END, _T_IDENT, _T_IN, _T_NOTIN, _T_BANG, _T_EQ, _T_DEQ, _T_NEQ, _T_GT, _T_LT, _T_OPEN, \
    _T_CLOSE, _T_COMMA = range(13)
_SYMBOLS = {"(": _T_OPEN, ")": _T_CLOSE, ",": _T_COMMA, "!": _T_BANG, "=": _T_EQ, "==": _T_DEQ,
            "!=": _T_NEQ, ">": _T_GT, "<": _T_LT}
_KEYWORDS = {"in": _T_IN, "notin": _T_NOTIN}
_SPECIAL = frozenset("=!(),><")
_WHITESPACE = frozenset(" \t\r\n")
_BINARY_OPERATORS = {_T_IN: Operator.IN, _T_NOTIN: Operator.NOT_IN, _T_EQ: Operator.EQUALS,
                     _T_DEQ: Operator.DOUBLE_EQUALS, _T_NEQ: Operator.NOT_EQUALS,
                     _T_GT: Operator.GREATER_THAN, _T_LT: Operator.LESS_THAN}
_OPERATOR_LIST = "in, notin, =, ==, !=, >, <"

_Token = tuple[int, str]


def _lex(text: str) -> list[_Token]:
    """Split ``text`` into tokens, ending with an end token.

    Symbols are matched longest first (only ``==`` and ``!=`` have two characters); any other run of
    characters up to a symbol or whitespace (space, tab, CR, LF) is an identifier or keyword.
    """
    tokens: list[_Token] = []
    pos, end = 0, len(text)
    while True:
        while pos < end and text[pos] in _WHITESPACE:
            pos += 1
        if pos == end:
            tokens.append((_T_END, ""))
            return tokens
        token, pos = _lex_one(text, pos, end)
        tokens.append(token)


def _lex_one(text: str, pos: int, end: int) -> tuple[_Token, int]:
    if text[pos] in _SPECIAL:
        literal = text[pos:pos + 2]
        if literal not in ("==", "!="):
            literal = text[pos]
        return (_SYMBOLS[literal], literal), pos + len(literal)
    start = pos
    while pos < end and text[pos] not in _SPECIAL and text[pos] not in _WHITESPACE:
        pos += 1
    literal = text[start:pos]
    return (_KEYWORDS.get(literal, _T_IDENT), literal), pos


def _describe(token: _Token) -> str:
    return "end of string" if token[0] == _T_END else repr(token[1])


class _LabelParser:
    """Recursive-descent parser over the token list.

    ``in`` and ``notin`` are keywords only where an operator is expected; everywhere else (keys, values)
    they are ordinary identifiers, as in Kubernetes (``in in (notin)`` is valid).
    """

    def __init__(self, text: str) -> None:
        self._tokens = _lex(text)
        self._pos = 0

    def _peek(self) -> _Token:
        kind, literal = self._tokens[self._pos]
        return (_T_IDENT, literal) if kind in (_T_IN, _T_NOTIN) else (kind, literal)

    def _next(self, operator_context: bool = False) -> _Token:
        token = self._tokens[self._pos] if operator_context else self._peek()
        self._pos += 1
        return token

    def parse(self) -> list[Requirement]:
        requirements: list[Requirement] = []
        token = self._peek()
        if token[0] == _T_END:
            return requirements
        while True:
            if token[0] not in (_T_IDENT, _T_BANG):
                raise _ParseError(f"found {_describe(token)}, expected: !, identifier, or end of string")
            requirements.append(self._requirement())
            token = self._next()
            if token[0] == _T_END:
                return requirements
            if token[0] != _T_COMMA:
                raise _ParseError(f"found {_describe(token)}, expected: ',' or end of string")
            token = self._peek()
            if token[0] not in (_T_IDENT, _T_BANG):
                raise _ParseError(f"found {_describe(token)}, expected: identifier after ','")

    def _requirement(self) -> Requirement:
        negated = self._peek()[0] == _T_BANG
        if negated:
            self._next()
        token = self._next()
        if token[0] != _T_IDENT:
            raise _ParseError(f"found {_describe(token)}, expected: identifier")
        key = token[1]
        errors = _label_key_errors(key)
        if errors:
            raise _ParseError(f"invalid label key {key!r}: " + "; ".join(errors))
        if negated:
            # Like Kubernetes, whatever follows "!key" is left for the caller, which rejects it.
            return Requirement(key, Operator.DOES_NOT_EXIST)
        if self._peek()[0] in (_T_END, _T_COMMA):
            return Requirement(key, Operator.EXISTS)
        operator = self._operator()
        values = self._value_set() if operator in _SET_OPERATORS else self._exact_value()
        return Requirement(key, operator, values)

    def _operator(self) -> Operator:
        token = self._next(operator_context=True)
        operator = _BINARY_OPERATORS.get(token[0])
        if operator is None:
            raise _ParseError(f"found {_describe(token)}, expected one of: {_OPERATOR_LIST}")
        return operator

    def _value_set(self) -> tuple[str, ...]:
        token = self._next()
        if token[0] != _T_OPEN:
            raise _ParseError(f"found {_describe(token)}, expected: '('")
        kind = self._peek()[0]
        if kind == _T_CLOSE:
            # Kubernetes reads "()" as the one-element set {""}.
            self._next()
            return ("",)
        if kind not in (_T_IDENT, _T_COMMA):
            raise _ParseError(f"found {_describe(self._peek())}, expected: ',', ')' or identifier")
        values = self._identifier_list()
        self._next()
        return tuple(values)

    def _identifier_list(self) -> set[str]:
        """Values up to (not including) ')'. Empty items, as in ``(a,,b)`` or ``(,a)``, mean ""."""
        values: set[str] = set()
        while True:
            token = self._next()
            if token[0] == _T_IDENT:
                values.add(token[1])
                following = self._peek()
                if following[0] == _T_CLOSE:
                    return values
                if following[0] != _T_COMMA:
                    raise _ParseError(f"found {_describe(following)}, expected: ',' or ')'")
            elif token[0] == _T_COMMA:
                following = self._peek()[0]
                if not values or following in (_T_CLOSE, _T_COMMA):
                    values.add("")
                if following == _T_CLOSE:
                    return values
            else:
                raise _ParseError(f"found {_describe(token)}, expected: ',' or identifier")

    def _exact_value(self) -> tuple[str, ...]:
        if self._peek()[0] in (_T_END, _T_COMMA):
            return ("",)
        token = self._next()
        if token[0] != _T_IDENT:
            raise _ParseError(f"found {_describe(token)}, expected: identifier")
        return (token[1],)


class _ParseError(Exception):
    """Internal: a grammar error, turned into BadRequestError with the selector quoted."""


def parse_label_selector(selector: str) -> LabelSelector:
    """Parse a Kubernetes label selector string (apimachinery pkg/labels/selector.go ``Parse``).

    Grammar: comma-separated requirements, each ``[!]key``, ``key=v``, ``key==v``, ``key!=v``,
    ``key in (v1,v2)``, ``key notin (v1)``, ``key>N`` or ``key<N``. Space, tab, CR and LF may surround
    tokens. A value may be empty (``key=``, ``key in (a,)``, ``key in ()``). The empty string selects
    everything. Returns a :class:`LabelSelector`, requirements sorted by key.

    Raises BadRequestError (400) on any grammar error, invalid key or value, a non-integer > / < value,
    or a NUL character; the message quotes the selector and names the offending token.
    """
    if "\x00" in selector:
        raise BadRequestError(f"unable to parse label selector {selector!r}: NUL character not allowed")
    try:
        requirements = _LabelParser(selector).parse()
    except (_ParseError, BadRequestError) as err:
        raise BadRequestError(f"unable to parse label selector {selector!r}: {err}") from None
    return LabelSelector(requirements) if requirements else EVERYTHING_LABELS


def label_selector_from_set(labels: Mapping[str, str]) -> LabelSelector:
    """A selector requiring every ``key=value`` of ``labels`` (labels.ValidatedSelectorFromSet).

    An empty mapping selects everything. Raises BadRequestError on an invalid key or value.
    """
    if not labels:
        return EVERYTHING_LABELS
    return LabelSelector(Requirement(k, Operator.EQUALS, (v,)) for k, v in labels.items())


# --------------------------------------------------------------------------------------------------
# Field selectors (apimachinery pkg/fields/selector.go)
# --------------------------------------------------------------------------------------------------


def escape_field_value(value: str) -> str:
    """Escape ``\\``, ``,`` and ``=`` with a backslash for use in a field selector (fields.EscapeValue)."""
    return value.replace("\\", "\\\\").replace(",", "\\,").replace("=", "\\=")


def unescape_field_value(value: str) -> str:
    """Undo :func:`escape_field_value` (fields.UnescapeValue).

    Raises BadRequestError on an escape other than ``\\\\``, ``\\,`` or ``\\=``, a trailing lone
    backslash, or an unescaped ``,`` or ``=``.
    """
    if "\\" not in value and "," not in value and "=" not in value:
        return value
    out: list[str] = []
    chars = iter(value)
    for char in chars:
        if char == "\\":
            escaped = next(chars, None)
            if escaped not in ("\\", ",", "="):
                sequence = "\\" + (escaped or "")
                raise BadRequestError(f"invalid field selector value {value!r}: "
                                      f"invalid escape sequence {sequence!r}")
            out.append(escaped)
        elif char in ",=":
            raise BadRequestError(f"invalid field selector value {value!r}: unescaped {char!r} "
                                  f"(write it as '\\{char}')")
        else:
            out.append(char)
    return "".join(out)


@dataclass(frozen=True, slots=True)
class FieldRequirement:
    """One field requirement: ``field``, ``operator`` (EQUALS or NOT_EQUALS) and ``value``.

    Mirrors apimachinery pkg/fields ``Requirement`` (hasTerm / notHasTerm). ``==`` is stored as EQUALS,
    as Kubernetes does. Field names are not validated (Kubernetes leaves that to the resource's field
    label conversion). Raises BadRequestError for any other operator.
    """

    field: str
    operator: Operator
    value: str

    def __post_init__(self) -> None:
        try:
            operator = Operator(self.operator)
        except ValueError:
            operator = None
        if operator is Operator.DOUBLE_EQUALS:
            operator = Operator.EQUALS
        if operator not in (Operator.EQUALS, Operator.NOT_EQUALS):
            raise BadRequestError(f"field selectors support only =, == and !=, not {self.operator!r}")
        object.__setattr__(self, "operator", operator)

    def matches(self, fields: Mapping[str, str]) -> bool:
        """Compare the field's value ("" when missing, as fields.Set.Get returns) with ``value``."""
        return (fields.get(self.field, "") == self.value) is (self.operator is Operator.EQUALS)

    def __str__(self) -> str:
        """``field=value`` or ``field!=value`` with the value escaped (hasTerm.String)."""
        return f"{self.field}{self.operator.value}{escape_field_value(self.value)}"


class FieldSelector:
    """An immutable, parsed field selector: the AND of its requirements.

    Mirrors apimachinery pkg/fields/selector.go (``andTerm`` of ``hasTerm`` / ``notHasTerm``). Build one
    with :func:`parse_field_selector`, :func:`field_selector_from_set`, or
    ``FieldSelector(requirements)`` with an iterable of :class:`FieldRequirement` (kept in the given
    order). A field missing from the matched mapping counts as "": ``f=`` matches it, ``f=x`` does not,
    ``f!=x`` does. Selectors compare and hash by their requirements. The constructor may return a
    private subclass specialised for the selector's shape.
    """

    __slots__ = ("_requirements", "_checks", "_string")

    def __new__(cls, requirements: Iterable[FieldRequirement] = ()) -> FieldSelector:
        reqs = tuple(requirements)
        for req in reqs:
            if not isinstance(req, FieldRequirement):
                raise TypeError(f"expected FieldRequirement, got {type(req).__name__}")
        checks = tuple((r.operator is Operator.EQUALS, r.field, r.value) for r in reqs)
        self = object.__new__(_field_selector_class(checks))
        object.__setattr__(self, "_requirements", reqs)
        object.__setattr__(self, "_checks", checks)
        object.__setattr__(self, "_string", ",".join(str(r) for r in reqs))
        self._specialise()
        return self

    def _specialise(self) -> None:
        """Hook for shape-specific subclasses to precompute their fast-path state."""

    def matches(self, fields: Mapping[str, str]) -> bool:
        """Whether ``fields`` (field path -> value) satisfy every requirement (Selector.Matches)."""
        get = fields.get
        for equal, field, value in self._checks:
            if (get(field, "") == value) is not equal:
                return False
        return True

    @property
    def empty(self) -> bool:
        """True when the selector has no requirements and so matches everything (Selector.Empty)."""
        return not self._requirements

    @property
    def requirements(self) -> tuple[FieldRequirement, ...]:
        """The requirements in canonical order."""
        return self._requirements

    def exact_value(self, field: str) -> str | None:
        """The value ``field`` must equal, or None (Selector.RequiresExactMatch).

        As in Kubernetes, the first ``=`` requirement on ``field`` decides; ``!=`` requirements are
        skipped. The returned value may be "".
        """
        for req in self._requirements:
            if req.field == field and req.operator is Operator.EQUALS:
                return req.value
        return None

    def __str__(self) -> str:
        """Canonical form (Selector.String()): ``f=v`` / ``f!=v`` terms, values escaped, joined by ","."""
        return self._string

    def __repr__(self) -> str:
        return f"FieldSelector({self._string!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, FieldSelector):
            return NotImplemented
        return self._requirements == other._requirements

    def __hash__(self) -> int:
        return hash(self._requirements)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __reduce__(self) -> tuple[type, tuple[tuple[FieldRequirement, ...]]]:
        # __new__ needs the requirements; the default slot-state pickling would bypass it.
        return (FieldSelector, (self._requirements,))


class _MatchAllFields(FieldSelector):
    """The empty field selector (fields.Everything())."""

    __slots__ = ()

    def matches(self, fields: Mapping[str, str]) -> bool:
        """Always True."""
        return True


class _OneEqualField(FieldSelector):
    """A single ``field=value``, e.g. a kubelet's ``spec.nodeName=node-1``."""

    __slots__ = ("_field", "_value")

    def _specialise(self) -> None:
        _, field, value = self._checks[0]
        object.__setattr__(self, "_field", field)
        object.__setattr__(self, "_value", value)

    def matches(self, fields: Mapping[str, str]) -> bool:
        """True when the field's value ("" when missing) equals the pinned value."""
        return fields.get(self._field, "") == self._value


def _field_selector_class(checks: tuple[tuple[bool, str, str], ...]) -> type[FieldSelector]:
    if not checks:
        return _MatchAllFields
    if len(checks) == 1 and checks[0][0]:
        return _OneEqualField
    return FieldSelector


def _split_terms(selector: str) -> list[str]:
    """Split on commas that are not backslash-escaped; escapes stay in the terms."""
    terms, start, escaped = [], 0, False
    for index, char in enumerate(selector):
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == ",":
            terms.append(selector[start:index])
            start = index + 1
    terms.append(selector[start:])
    return terms


def _split_term(term: str) -> tuple[str, Operator, str] | None:
    """Split at the first operator (``!=``, ``==`` or ``=``), or None when there is none.

    Every operator contains ``=``, so the first ``=`` locates it; the field part is never unescaped.
    """
    index = term.find("=")
    if index < 0:
        return None
    if index > 0 and term[index - 1] == "!":
        return term[:index - 1], Operator.NOT_EQUALS, term[index + 1:]
    if term.startswith("=", index + 1):
        return term[:index], Operator.EQUALS, term[index + 2:]
    return term[:index], Operator.EQUALS, term[index + 1:]


def parse_field_selector(selector: str) -> FieldSelector:
    """Parse a Kubernetes field selector string (apimachinery pkg/fields/selector.go ``ParseSelector``).

    Grammar: comma-separated ``field=value``, ``field==value`` or ``field!=value``; in values ``\\,``,
    ``\\=`` and ``\\\\`` stand for ``,``, ``=`` and ``\\``. As in Kubernetes: whitespace is literal
    (never trimmed), empty terms (``a=b,`` or ``,``) are skipped, terms are sorted by their text, and a
    term with both field and value empty (``=`` or ``!=``) is dropped. The empty string selects
    everything. Returns a :class:`FieldSelector`.

    Raises BadRequestError (400) for a term without an operator (which includes set-based forms such as
    ``f in (a)``, ``f`` or ``!f``), an invalid escape, or an unescaped ``,`` / ``=`` in a value.
    """
    requirements = []
    for term in sorted(_split_terms(selector)):
        if term:
            requirement = _parse_field_term(selector, term)
            if requirement is not None:
                requirements.append(requirement)
    return FieldSelector(requirements) if requirements else EVERYTHING_FIELDS


def _parse_field_term(selector: str, term: str) -> FieldRequirement | None:
    split = _split_term(term)
    if split is None:
        raise BadRequestError(f"invalid field selector {selector!r}: can't understand {term!r}; "
                              "field selectors support only =, == and !=")
    field, operator, raw_value = split
    try:
        value = unescape_field_value(raw_value)
    except BadRequestError as err:
        raise BadRequestError(f"invalid field selector {selector!r}: {err.message}") from None
    if not field and not value:
        return None
    return FieldRequirement(field, operator, value)


def field_selector_from_set(fields: Mapping[str, str]) -> FieldSelector:
    """A selector requiring every ``field=value`` of ``fields``, sorted by field (fields.SelectorFromSet).

    An empty mapping selects everything. Never raises: field names and values are not validated.
    """
    if not fields:
        return EVERYTHING_FIELDS
    return FieldSelector(FieldRequirement(f, Operator.EQUALS, v) for f, v in sorted(fields.items()))


# --------------------------------------------------------------------------------------------------
# Everything, and the SelectionPredicate (apiserver pkg/storage/selection_predicate.go)
# --------------------------------------------------------------------------------------------------

#: The label selector that matches everything (labels.Everything()).
EVERYTHING_LABELS: LabelSelector = LabelSelector()
#: The field selector that matches everything (fields.Everything()).
EVERYTHING_FIELDS: FieldSelector = FieldSelector()


def everything_labels() -> LabelSelector:
    """The shared label selector that matches everything (labels.Everything())."""
    return EVERYTHING_LABELS


def everything_fields() -> FieldSelector:
    """The shared field selector that matches everything (fields.Everything())."""
    return EVERYTHING_FIELDS


_NAME_FIELD = "metadata.name"
_NAMESPACE_FIELD = "metadata.namespace"


@dataclass(frozen=True, slots=True)
class SelectionPredicate:
    """What a LIST or WATCH selects: label and field selectors plus paging and bookmark options.

    Mirrors apiserver pkg/storage/selection_predicate.go ``SelectionPredicate`` (without GetAttrs and
    index names: callers pass precomputed label and field mappings). ``limit`` is the page size
    (0 = unlimited); ``continue_token`` the token of a previous page. Raises BadRequestError when
    ``limit`` is negative.
    """

    label: LabelSelector = EVERYTHING_LABELS
    field: FieldSelector = EVERYTHING_FIELDS
    limit: int = 0
    continue_token: str = ""
    allow_watch_bookmarks: bool = False

    def __post_init__(self) -> None:
        if self.limit < 0:
            raise BadRequestError(f"limit must be non-negative, got {self.limit}")

    @classmethod
    def parse(cls, label_selector: str = "", field_selector: str = "", limit: int = 0,
              continue_token: str = "", allow_watch_bookmarks: bool = False) -> SelectionPredicate:
        """Build a predicate from selector strings.

        Raises BadRequestError (400) for a malformed label or field selector or a negative limit.
        """
        return cls(parse_label_selector(label_selector), parse_field_selector(field_selector), limit,
                   continue_token, allow_watch_bookmarks)

    def empty(self) -> bool:
        """True when neither selector filters anything (SelectionPredicate.Empty)."""
        return self.label.empty and self.field.empty

    def matches_attrs(self, labels: Mapping[str, str], fields: Mapping[str, str]) -> bool:
        """Whether an object with these labels and fields is selected (MatchesObjectAttributes)."""
        return self.label.matches(labels) and self.field.matches(fields)

    def matches_single_name(self) -> str | None:
        """The ``metadata.name`` the field selector pins, or None (SelectionPredicate.MatchesSingle).

        None as well when a continue token is set, since a continued list cannot be a single GET.
        """
        return None if self.continue_token else self.field.exact_value(_NAME_FIELD)

    def matches_single_namespace(self) -> str | None:
        """The pinned ``metadata.namespace``, or None; None when continuing (MatchesSingleNamespace)."""
        return None if self.continue_token else self.field.exact_value(_NAMESPACE_FIELD)

    def pinned_field(self, name: str) -> str | None:
        """The value the field selector requires for field ``name``, or None (for index lookups)."""
        return self.field.exact_value(name)

    def pinned_label(self, name: str) -> str | None:
        """The value the label selector requires for label ``name``, or None (for index lookups)."""
        return self.label.exact_value(name)
