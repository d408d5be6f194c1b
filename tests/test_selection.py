"""Label selectors, field selectors and SelectionPredicate against Kubernetes' grammar and semantics.

Expected results follow apimachinery pkg/labels/selector.go, pkg/fields/selector.go and apiserver
pkg/storage/selection_predicate.go (including their quirks, e.g. ``x in ()`` and field selector ``=``).
"""

from __future__ import annotations

import copy
import itertools
import pickle

import pytest

from storage.errors import BadRequestError
from storage.selection import (
    EVERYTHING_FIELDS, EVERYTHING_LABELS, FieldRequirement, FieldSelector, LabelSelector, Operator,
    Requirement, SelectionPredicate, escape_field_value, everything_fields, everything_labels,
    field_selector_from_set, label_selector_from_set, parse_field_selector, parse_label_selector,
    unescape_field_value,
)

# --------------------------------------------------------------------------------------------------
# Label selectors: accepted forms and their canonical strings
# --------------------------------------------------------------------------------------------------

ACCEPTED_LABEL_SELECTORS = [
    ("", ""),
    ("x=a", "x=a"),
    ("x==a", "x==a"),
    ("x!=a", "x!=a"),
    ("x=a,y=b,z=c", "x=a,y=b,z=c"),
    ("z=c,x=a,y=b", "x=a,y=b,z=c"),                    # sorted by key
    ("x in (b,a,a)", "x in (a,b)"),                     # values sorted and deduplicated
    ("x notin (a)", "x notin (a)"),
    ("x", "x"),
    ("!x", "!x"),
    ("x>1", "x>1"),
    ("x<5,x>1", "x<5,x>1"),                             # same key keeps input order
    ("x=", "x="),                                       # empty value
    ("x==", "x=="),
    ("x!=", "x!="),
    ("x= ,z= ", "x=,z="),
    ("x=,y", "x=,y"),
    ("x in ()", "x in ()"),                             # Kubernetes reads () as {""}
    ("x in (,)", "x in ()"),
    ("x in (,a)", "x in (,a)"),
    ("x in (a,)", "x in (,a)"),
    ("x in (a,,b)", "x in (,a,b)"),
    ("x notin ()", "x notin ()"),
    ("  x  in  ( a , b ) ,\ty\n,\r!z ", "x in (a,b),y,!z"),
    ("x in(a)", "x in (a)"),
    ("in in (in,notin)", "in in (in,notin)"),           # keywords are identifiers outside operators
    ("notin=in", "notin=in"),
    ("example.com/app==web", "example.com/app==web"),
    ("a.b-c_d=E.f-G_h", "a.b-c_d=E.f-G_h"),
    ("x>007", "x>007"),
    ("k" * 63 + "=" + "v" * 63, "k" * 63 + "=" + "v" * 63),
    ("p" * 253 + "/n=v", "p" * 253 + "/n=v"),
]


@pytest.mark.parametrize("text, canonical", ACCEPTED_LABEL_SELECTORS)
def test_label_selector_accepted_and_canonical(text: str, canonical: str) -> None:
    selector = parse_label_selector(text)
    assert str(selector) == canonical
    # The canonical form is itself a selector string that parses to the same selector.
    assert parse_label_selector(canonical) == selector


def test_label_selector_order_independent() -> None:
    assert parse_label_selector("x=a,a=x") == parse_label_selector("a=x,x=a")
    assert hash(parse_label_selector("x=a,a=x")) == hash(parse_label_selector("a=x,x=a"))
    assert str(parse_label_selector("b in (2,1),a")) == "a,b in (1,2)"


def test_label_requirements_shape() -> None:
    selector = parse_label_selector("z notin (b,a),x=1,!w,v,u>3")
    assert selector.requirements == (
        Requirement("u", Operator.GREATER_THAN, ("3",)),
        Requirement("v", Operator.EXISTS),
        Requirement("w", Operator.DOES_NOT_EXIST),
        Requirement("x", Operator.EQUALS, ("1",)),
        Requirement("z", Operator.NOT_IN, ("a", "b")),
    )
    assert isinstance(selector.requirements, tuple)
    assert selector.requirements[4].values == ("a", "b")


def test_label_operators_keep_their_spelling() -> None:
    operators = [r.operator for r in parse_label_selector("a=1,b==2,c!=3,d in (4),e notin (5),f,!g,"
                                                          "h>1,i<2").requirements]
    assert operators == [Operator.EQUALS, Operator.DOUBLE_EQUALS, Operator.NOT_EQUALS, Operator.IN,
                         Operator.NOT_IN, Operator.EXISTS, Operator.DOES_NOT_EXIST,
                         Operator.GREATER_THAN, Operator.LESS_THAN]
    assert str(Operator.NOT_IN) == "notin"


# --------------------------------------------------------------------------------------------------
# Label selectors: rejected forms
# --------------------------------------------------------------------------------------------------

REJECTED_LABEL_SELECTORS = [
    ("=b", "'='"),
    ("a in b", "'b'"),
    ("a in (x", "end of string"),
    ("a in", "end of string"),
    ("a notin", "end of string"),
    ("a in (x y)", "'y'"),
    ("a in (x,=)", "'='"),
    ("a in (x))", "')'"),
    ("a in (x)(y)", "'('"),
    ("a b", "'b'"),
    ("a IN (x)", "'IN'"),
    ("!", "end of string"),
    ("!!a", "'!'"),
    ("a!", "'!'"),
    ("!x=a", "'='"),
    (",", "','"),
    ("a,", "after ','"),
    (",a", "','"),
    ("a,,b", "after ','"),
    ("x==a==b", "'=='"),
    ("a=b=c", "'='"),
    ("a===b", "'='"),
    ("a=!b", "'!'"),
    ("a=(x)", "'('"),
    ("a=b c", "'c'"),
    ("a>=1", "'='"),
    ("x<a", "'a'"),
    ("x>", "''"),
    ("x>-1", "'-1'"),                                  # integer, but not a valid label value
    ("x>1.5", "'1.5'"),
    ("x<99999999999999999999", "'99999999999999999999'"),  # overflows int64
    ("x=a||y=b", "'a||y'"),
    ("x=a/b", "'a/b'"),
    ("x=-a", "'-a'"),
    ("x=a-", "'a-'"),
    ("x=" + "v" * 64, "63"),
    ("k" * 64, "63"),
    ("-k=v", "'-k'"),
    ("k.=v", "'k.'"),
    ("a/b/c=v", "'a/b/c'"),
    ("/k=v", "prefix"),
    ("k/=v", "name part"),
    ("Example.com/k=v", "prefix"),
    ("p" * 254 + "/k=v", "253"),
    ("ké=v", "'ké'"),
    ("a\v=b", "'a\\x0b'"),                             # only space, tab, CR and LF are whitespace
    ("a\x00", "NUL"),                                  # deliberate: Kubernetes truncates at NUL
    ("\x00a=b", "NUL"),
]


@pytest.mark.parametrize("text, offending", REJECTED_LABEL_SELECTORS)
def test_label_selector_rejected(text: str, offending: str) -> None:
    with pytest.raises(BadRequestError) as info:
        parse_label_selector(text)
    assert info.value.status == 400
    assert info.value.reason == "BadRequest"
    assert repr(text) in info.value.message
    # The selector is quoted first; the offending part is named after it.
    assert offending in info.value.message.split(repr(text), 1)[1]


# --------------------------------------------------------------------------------------------------
# Label selectors: matching
# --------------------------------------------------------------------------------------------------

LABELS = {"app": "web", "tier": "frontend", "n": "5", "empty": ""}

LABEL_MATCHES = [
    ("", {}, True),
    ("", LABELS, True),
    ("app=web", LABELS, True),
    ("app=db", LABELS, False),
    ("missing=web", LABELS, False),
    ("app==web", LABELS, True),
    ("app==db", LABELS, False),
    ("app!=db", LABELS, True),
    ("app!=web", LABELS, False),
    ("missing!=web", LABELS, True),                    # != passes when the key is absent
    ("app in (db,web)", LABELS, True),
    ("app in (db,cache)", LABELS, False),
    ("missing in (db,web)", LABELS, False),
    ("app in (web)", LABELS, True),
    ("app notin (db,cache)", LABELS, True),
    ("app notin (db,web)", LABELS, False),
    ("app notin (web)", LABELS, False),
    ("missing notin (web)", LABELS, True),             # notin passes when the key is absent
    ("app", LABELS, True),
    ("missing", LABELS, False),
    ("!missing", LABELS, True),
    ("!app", LABELS, False),
    ("empty", LABELS, True),                           # exists even with an empty value
    ("!empty", LABELS, False),
    ("empty=", LABELS, True),
    ("missing=", LABELS, False),                       # = requires presence, even for ""
    ("empty!=", LABELS, False),
    ("missing!=", LABELS, True),
    ("empty in ()", LABELS, True),
    ("app in ()", LABELS, False),
    ("empty notin ()", LABELS, False),
    ("n>4", LABELS, True),
    ("n>5", LABELS, False),
    ("n<6", LABELS, True),
    ("n<5", LABELS, False),
    ("missing>0", LABELS, False),
    ("missing<9", LABELS, False),
    ("app>0", LABELS, False),                          # non-integer label value never compares
    ("app<0", LABELS, False),
    ("app=web,tier=frontend", LABELS, True),
    ("app=web,tier=backend", LABELS, False),
    ("app=web,tier in (frontend),!missing,n>1,n<9,app notin (db)", LABELS, True),
    ("app=web,tier in (frontend),!missing,n>1,n<9,app notin (web)", LABELS, False),
    ("in in (in)", {"in": "in"}, True),
]


@pytest.mark.parametrize("text, labels, expected", LABEL_MATCHES)
def test_label_selector_matches(text: str, labels: dict[str, str], expected: bool) -> None:
    selector = parse_label_selector(text)
    assert selector.matches(labels) is expected
    # Each requirement alone agrees with the selector as a whole (AND semantics).
    assert all(r.matches(labels) for r in selector.requirements) is expected


@pytest.mark.parametrize("value, selector, expected", [
    ("+7", "n>6", True),                               # ParseInt accepts a sign on the label side
    ("-7", "n<0", True),
    ("-7", "n>0", False),
    ("007", "n>6", True),
    ("1_000", "n>6", False),                           # no underscores in base 10
    (" 7", "n>6", False),
    ("٧", "n>6", False),                               # non-ASCII digit
    ("9223372036854775807", "n>6", True),
    ("9223372036854775808", "n>6", False),             # out of int64 range
    ("-9223372036854775808", "n<0", True),
    ("-9223372036854775809", "n<0", False),
])
def test_label_greater_less_parse_label_value_as_int64(value: str, selector: str, expected: bool) -> None:
    assert parse_label_selector(selector).matches({"n": value}) is expected


def _reference_matches(req: Requirement, labels: dict[str, str]) -> bool:
    """Requirement.Matches from apimachinery, written out case by case."""
    present = req.key in labels
    value = labels.get(req.key)
    op = req.operator
    if op in (Operator.EQUALS, Operator.DOUBLE_EQUALS, Operator.IN):
        return present and value in req.values
    if op in (Operator.NOT_EQUALS, Operator.NOT_IN):
        return not present or value not in req.values
    if op is Operator.EXISTS:
        return present
    if op is Operator.DOES_NOT_EXIST:
        return not present
    if not present or not value.isdigit():
        return False
    bound = int(req.values[0])
    return int(value) > bound if op is Operator.GREATER_THAN else int(value) < bound


def test_label_matches_agrees_with_reference_over_grid() -> None:
    # Every shape (including the specialised empty and single-equality ones) against one reference.
    atoms = ["a=1", "a!=1", "a in (1,2)", "a in (2)", "a notin (1,2)", "a notin (2)", "a", "!a",
             "b=", "b!=", "a>1", "a<2", "b in ()"]
    label_sets = [{}, {"a": "1"}, {"a": "2"}, {"a": "x"}, {"b": ""}, {"a": "1", "b": ""},
                  {"a": "3", "b": "x"}]
    checked = 0
    for size in (0, 1, 2):
        for combo in itertools.combinations(atoms, size):
            selector = parse_label_selector(",".join(combo))
            for labels in label_sets:
                expected = all(_reference_matches(r, labels) for r in selector.requirements)
                assert selector.matches(labels) is expected, (combo, labels)
                checked += 1
    assert checked == (1 + len(atoms) + len(atoms) * (len(atoms) - 1) // 2) * len(label_sets)


# --------------------------------------------------------------------------------------------------
# Label selectors: exact_value, empty, construction
# --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, key, expected", [
    ("app=web", "app", "web"),
    ("app==web", "app", "web"),
    ("app in (web)", "app", "web"),
    ("app=", "app", ""),
    ("app in (db,web)", "app", None),
    ("app!=web", "app", None),
    ("app notin (web)", "app", None),
    ("app", "app", None),
    ("!app", "app", None),
    ("app=web", "tier", None),
    ("", "app", None),
    ("a=1,app=web,z=2", "app", "web"),
    ("app in (db,web),app=web", "app", None),         # the first requirement on the key decides
])
def test_label_exact_value(text: str, key: str, expected: str | None) -> None:
    assert parse_label_selector(text).exact_value(key) == expected


def test_label_empty() -> None:
    assert parse_label_selector("").empty is True
    assert parse_label_selector("   ").empty is True
    assert parse_label_selector("a").empty is False
    assert parse_label_selector("") is EVERYTHING_LABELS
    assert everything_labels() is EVERYTHING_LABELS
    assert EVERYTHING_LABELS.matches({"anything": "at-all"}) is True
    assert EVERYTHING_LABELS.requirements == ()
    assert str(EVERYTHING_LABELS) == ""


def test_label_selector_is_immutable_and_picklable() -> None:
    selector = parse_label_selector("app=web,tier in (a,b)")
    with pytest.raises(AttributeError):
        selector._checks = ()  # type: ignore[misc]
    with pytest.raises(AttributeError):
        selector.requirements = ()  # type: ignore[misc]
    for clone in (pickle.loads(pickle.dumps(selector)), copy.deepcopy(selector)):
        assert clone == selector
        assert clone.matches({"app": "web", "tier": "b"}) is True
        assert clone.matches({"app": "web", "tier": "c"}) is False
    single = parse_label_selector("app=web")
    assert pickle.loads(pickle.dumps(single)).matches({"app": "db"}) is False


def test_label_selector_equality_and_repr() -> None:
    assert parse_label_selector("a=1") != parse_label_selector("a==1")
    assert parse_label_selector("a=1") != parse_field_selector("a=1")
    assert repr(parse_label_selector("b,a=1")) == "LabelSelector('a=1,b')"


def test_label_selector_from_set() -> None:
    selector = label_selector_from_set({"tier": "frontend", "app": "web"})
    assert str(selector) == "app=web,tier=frontend"
    assert selector.matches({"app": "web", "tier": "frontend", "x": "y"}) is True
    assert selector.matches({"app": "web"}) is False
    assert label_selector_from_set({}) is EVERYTHING_LABELS
    with pytest.raises(BadRequestError):
        label_selector_from_set({"app": "not valid"})


def test_requirement_constructor_validates() -> None:
    assert Requirement("a", "in", ("y", "x", "x")).values == ("x", "y")
    assert Requirement("a", "notin", ("x",)).operator is Operator.NOT_IN
    bad = [("a", "in", ()), ("a", "=", ("x", "y")), ("a", "exists", ("x",)), ("a", "gt", ("x",)),
           ("a", "lt", ()), ("a", "~", ("x",)), ("bad key", "=", ("x",)), ("a", "=", ("bad value",))]
    for key, op, values in bad:
        with pytest.raises(BadRequestError) as info:
            Requirement(key, op, values)
        assert info.value.status == 400
    with pytest.raises(TypeError):
        Requirement("a", "=", "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        LabelSelector(["a=b"])  # type: ignore[list-item]


def test_label_selector_from_requirements_sorts_by_key() -> None:
    selector = LabelSelector([Requirement("b", "exists"), Requirement("a", "=", ("1",))])
    assert str(selector) == "a=1,b"
    assert selector == parse_label_selector("b,a=1")


# --------------------------------------------------------------------------------------------------
# Field selectors
# --------------------------------------------------------------------------------------------------

ACCEPTED_FIELD_SELECTORS = [
    ("", ""),
    ("metadata.name=p1", "metadata.name=p1"),
    ("metadata.name==p1", "metadata.name=p1"),           # == is stored as =
    ("metadata.name!=p1", "metadata.name!=p1"),
    ("b=1,a=2", "a=2,b=1"),                             # terms sorted by their text
    ("a=1,", "a=1"),                                    # empty terms are skipped
    (",a=1", "a=1"),
    (",", ""),
    ("=", ""),                                          # empty field and value: dropped
    ("!=", ""),
    ("a=", "a="),
    ("=x", "=x"),
    ("a=!b", "a=!b"),
    ("a = b", "a = b"),                                 # whitespace is literal
    (r"a=x\,y", r"a=x\,y"),
    (r"a=x\=y", r"a=x\=y"),
    (r"a=x\\y", r"a=x\\y"),
    (r"a=x\\,b=y", r"a=x\\,b=y"),                       # escaped backslash, then a separator
    ("a=(x)", "a=(x)"),
    ("spec.nodeName=node-1,metadata.namespace!=kube-system",
     "metadata.namespace!=kube-system,spec.nodeName=node-1"),
]


@pytest.mark.parametrize("text, canonical", ACCEPTED_FIELD_SELECTORS)
def test_field_selector_accepted_and_canonical(text: str, canonical: str) -> None:
    selector = parse_field_selector(text)
    assert str(selector) == canonical
    assert parse_field_selector(canonical) == selector


def test_field_requirements_shape() -> None:
    selector = parse_field_selector(r"spec.nodeName==n\,1,metadata.name!=x")
    assert selector.requirements == (
        FieldRequirement("metadata.name", Operator.NOT_EQUALS, "x"),
        FieldRequirement("spec.nodeName", Operator.EQUALS, "n,1"),
    )
    assert parse_field_selector("a = b").requirements == (FieldRequirement("a ", Operator.EQUALS, " b"),)


REJECTED_FIELD_SELECTORS = [
    ("a", "'a'"),
    ("a in (x)", "'a in (x)'"),
    ("a notin (x)", "'a notin (x)'"),
    ("!a", "'!a'"),
    ("a,b=c", "'a'"),
    ("a<1", "'a<1'"),
    ("a>1", "'a>1'"),
    ("a=b=c", "'='"),
    ("a===b", "'='"),
    ("a!==b", "'='"),
    (r"a=\x", r"'\\x'"),
    ("a=b\\", r"'\\'"),
]


@pytest.mark.parametrize("text, offending", REJECTED_FIELD_SELECTORS)
def test_field_selector_rejected(text: str, offending: str) -> None:
    with pytest.raises(BadRequestError) as info:
        parse_field_selector(text)
    assert info.value.status == 400
    assert repr(text) in info.value.message
    # The selector is quoted first; the offending part is named after it.
    assert offending in info.value.message.split(repr(text), 1)[1]


@pytest.mark.parametrize("text", ["a", "a in (x)", "!a", "a>1"])
def test_field_selector_set_based_forms_name_the_supported_operators(text: str) -> None:
    with pytest.raises(BadRequestError, match="support only =, == and !="):
        parse_field_selector(text)


FIELDS = {"metadata.name": "p1", "metadata.namespace": "ns", "spec.nodeName": "", "v": "a,b=c\\"}

FIELD_MATCHES = [
    ("", {}, True),
    ("metadata.name=p1", FIELDS, True),
    ("metadata.name==p1", FIELDS, True),
    ("metadata.name=p2", FIELDS, False),
    ("metadata.name!=p2", FIELDS, True),
    ("metadata.name!=p1", FIELDS, False),
    ("missing=x", FIELDS, False),
    ("missing!=x", FIELDS, True),
    ("missing=", FIELDS, True),                        # a missing field reads as ""
    ("missing!=", FIELDS, False),
    ("spec.nodeName=", FIELDS, True),
    ("spec.nodeName!=", FIELDS, False),
    (r"v=a\,b\=c\\", FIELDS, True),
    ("metadata.name=p1,metadata.namespace=ns", FIELDS, True),
    ("metadata.name=p1,metadata.namespace=other", FIELDS, False),
    ("metadata.name=p1,metadata.namespace!=ns", FIELDS, False),
    ("metadata.name!=a,metadata.namespace!=b", FIELDS, True),
    ("metadata.name = p1", FIELDS, False),             # literal spaces are part of field and value
]


@pytest.mark.parametrize("text, fields, expected", FIELD_MATCHES)
def test_field_selector_matches(text: str, fields: dict[str, str], expected: bool) -> None:
    selector = parse_field_selector(text)
    assert selector.matches(fields) is expected
    assert all(r.matches(fields) for r in selector.requirements) is expected


@pytest.mark.parametrize("text, field, expected", [
    ("metadata.name=p1", "metadata.name", "p1"),
    ("metadata.name==p1", "metadata.name", "p1"),
    ("metadata.name=", "metadata.name", ""),
    ("metadata.name!=p1", "metadata.name", None),
    ("metadata.name!=p1,metadata.name=p2", "metadata.name", "p2"),   # != terms are skipped
    (r"a=x\,y", "a", "x,y"),
    ("a=1", "b", None),
    ("", "a", None),
])
def test_field_exact_value(text: str, field: str, expected: str | None) -> None:
    assert parse_field_selector(text).exact_value(field) == expected


@pytest.mark.parametrize("raw, escaped", [
    ("plain", "plain"),
    ("", ""),
    ("a,b", r"a\,b"),
    ("a=b", r"a\=b"),
    ("a\\b", r"a\\b"),
    ("\\,=", r"\\\,\="),
    ("x\\,y", r"x\\\,y"),
])
def test_field_value_escaping_round_trips(raw: str, escaped: str) -> None:
    assert escape_field_value(raw) == escaped
    assert unescape_field_value(escaped) == raw
    selector = parse_field_selector("f=" + escaped)
    assert selector.exact_value("f") == raw
    assert str(selector) == "f=" + escaped


@pytest.mark.parametrize("bad", [r"\x", "a\\", "a,b", "a=b", r"\\\x"])
def test_unescape_field_value_rejects(bad: str) -> None:
    with pytest.raises(BadRequestError) as info:
        unescape_field_value(bad)
    assert info.value.status == 400


def test_field_empty_and_everything() -> None:
    assert parse_field_selector("").empty is True
    assert parse_field_selector("=").empty is True
    assert parse_field_selector("a=").empty is False
    assert parse_field_selector("") is EVERYTHING_FIELDS
    assert everything_fields() is EVERYTHING_FIELDS
    assert EVERYTHING_FIELDS.matches({"x": "y"}) is True
    assert str(EVERYTHING_FIELDS) == ""


def test_field_selector_from_set_and_constructor() -> None:
    selector = field_selector_from_set({"spec.nodeName": "n1", "metadata.name": "p"})
    assert str(selector) == "metadata.name=p,spec.nodeName=n1"
    assert selector.matches({"metadata.name": "p", "spec.nodeName": "n1"}) is True
    assert selector.matches({"metadata.name": "p"}) is False
    assert field_selector_from_set({}) is EVERYTHING_FIELDS
    assert FieldRequirement("f", "==", "v").operator is Operator.EQUALS
    with pytest.raises(BadRequestError, match="support only =, == and !="):
        FieldRequirement("f", Operator.IN, "v")
    with pytest.raises(TypeError):
        FieldSelector(["f=v"])  # type: ignore[list-item]


def test_field_selector_is_immutable_and_picklable() -> None:
    selector = parse_field_selector("a=1,b!=2")
    with pytest.raises(AttributeError):
        selector._checks = ()  # type: ignore[misc]
    clone = pickle.loads(pickle.dumps(selector))
    assert clone == selector and hash(clone) == hash(selector)
    assert clone.matches({"a": "1", "b": "3"}) is True
    assert clone.matches({"a": "1", "b": "2"}) is False
    assert repr(selector) == "FieldSelector('a=1,b!=2')"


# --------------------------------------------------------------------------------------------------
# SelectionPredicate
# --------------------------------------------------------------------------------------------------

def test_predicate_parse_and_match() -> None:
    predicate = SelectionPredicate.parse("app=web", "spec.nodeName=n1", limit=10, continue_token="",
                                         allow_watch_bookmarks=True)
    assert predicate.label == parse_label_selector("app=web")
    assert predicate.field == parse_field_selector("spec.nodeName=n1")
    assert (predicate.limit, predicate.allow_watch_bookmarks) == (10, True)
    assert predicate.matches_attrs({"app": "web"}, {"spec.nodeName": "n1"}) is True
    assert predicate.matches_attrs({"app": "db"}, {"spec.nodeName": "n1"}) is False
    assert predicate.matches_attrs({"app": "web"}, {"spec.nodeName": "n2"}) is False
    assert predicate.empty() is False


def test_predicate_defaults_select_everything() -> None:
    predicate = SelectionPredicate()
    assert predicate.empty() is True
    assert predicate.matches_attrs({}, {}) is True
    assert predicate.label is EVERYTHING_LABELS and predicate.field is EVERYTHING_FIELDS
    assert SelectionPredicate.parse() == predicate
    assert SelectionPredicate.parse("a").empty() is False
    assert SelectionPredicate.parse("", "a=b").empty() is False


def test_predicate_single_name_and_namespace() -> None:
    predicate = SelectionPredicate.parse("", "metadata.name=p1,metadata.namespace=ns")
    assert predicate.matches_single_name() == "p1"
    assert predicate.matches_single_namespace() == "ns"
    continued = SelectionPredicate.parse("", "metadata.name=p1,metadata.namespace=ns", continue_token="t")
    assert continued.matches_single_name() is None
    assert continued.matches_single_namespace() is None
    assert SelectionPredicate.parse("", "metadata.name!=p1").matches_single_name() is None
    assert SelectionPredicate.parse("metadata.name=p1").matches_single_name() is None
    assert SelectionPredicate.parse("", "metadata.name=").matches_single_name() == ""


def test_predicate_pinned_field_and_label() -> None:
    predicate = SelectionPredicate.parse("app in (web),tier in (a,b)", "spec.nodeName=n1",
                                         continue_token="t")
    assert predicate.pinned_field("spec.nodeName") == "n1"        # continue does not matter here
    assert predicate.pinned_field("metadata.name") is None
    assert predicate.pinned_label("app") == "web"
    assert predicate.pinned_label("tier") is None


@pytest.mark.parametrize("kwargs", [
    {"label_selector": "a in b"},
    {"field_selector": "a"},
    {"limit": -1},
])
def test_predicate_parse_rejects(kwargs: dict) -> None:
    with pytest.raises(BadRequestError) as info:
        SelectionPredicate.parse(**kwargs)
    assert info.value.status == 400


def test_predicate_is_frozen_and_hashable() -> None:
    predicate = SelectionPredicate.parse("a=1", "b=2", limit=5)
    with pytest.raises(AttributeError):
        predicate.limit = 1  # type: ignore[misc]
    assert {predicate: 1}[SelectionPredicate.parse("a=1", "b=2", limit=5)] == 1
    with pytest.raises(BadRequestError):
        SelectionPredicate(limit=-5)
