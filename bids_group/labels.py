"""Deterministic BIDS-safe labels for contrast names.

A BIDS entity value may hold only letters and digits, so a contrast written as
``group.patient - group.control`` must be renamed before it can appear in ``contrast-<label>``.
The mapping is a pure function (documented here, tested with doctests) so the same model always
gives the same file names, and the resolved model records it.

Rules of :func:`to_label`
-------------------------
* ``1`` and ``intercept`` (any case) give ``intercept``.
* A name that is already alphanumeric is kept exactly as written (``FacesVsScrambled``).
* Otherwise the name is cut into words. Operators become words: ``>`` Gt, ``<`` Lt, ``+`` Plus,
  ``-`` Minus, ``*`` Times, ``/`` Over. ``.``, ``_``, spaces and any other character are word
  breaks. The first word keeps its case; every later word gets an upper-case first letter.
"""

from __future__ import annotations

import re

#: Operator characters and the word that replaces each of them.
OPERATOR_WORDS: dict[str, str] = {
    ">": "Gt",
    "<": "Lt",
    "+": "Plus",
    "-": "Minus",
    "*": "Times",
    "/": "Over",
}

INTERCEPT = "intercept"

_TOKEN = re.compile(r"[A-Za-z0-9]+|[<>+\-*/]")


def _capitalise(word: str) -> str:
    """Upper-case the first character only (``fooBar`` -> ``FooBar``)."""
    return word[:1].upper() + word[1:]


def to_label(name: str) -> str:
    """Turn a contrast or column name into a BIDS-safe alphanumeric camelCase label.

    Parameters
    ----------
    name : str
        Name as written in the model (a column name, a contrast name or an expression).

    Returns
    -------
    str
        Non-empty string of ``[A-Za-z0-9]`` characters.

    Raises
    ------
    ValueError
        If ``name`` has no letter, digit or operator at all (e.g. ``"..."``).

    Examples
    --------
    >>> to_label("group.patient - group.control")
    'groupPatientMinusGroupControl'
    >>> to_label("faces > scrambled")
    'facesGtScrambled'
    >>> to_label("FacesVsScrambled")
    'FacesVsScrambled'
    >>> to_label("age_z")
    'ageZ'
    >>> to_label("2*a + b/3")
    '2TimesAPlusBOver3'
    >>> to_label(1), to_label("Intercept")
    ('intercept', 'intercept')
    """
    text = str(name).strip()
    if text == "1" or text.lower() == INTERCEPT:
        return INTERCEPT
    if text.isascii() and text.isalnum():
        return text
    words = [OPERATOR_WORDS.get(tok, tok) for tok in _TOKEN.findall(text)]
    if not words:
        raise ValueError(f"cannot make a BIDS label from {name!r}: it has no letter or digit")
    return words[0] + "".join(_capitalise(w) for w in words[1:])


def group_contrast_label(input_contrast: str | None, contrast_name: str) -> str:
    """Label of a group-level contrast, following the rule in ARCHITECTURE.md.

    With ``GroupBy: [contrast]`` one model is fitted per first-level contrast ``<in>``. A group
    contrast that is the intercept keeps ``<in>``; any other group contrast ``<g>`` becomes
    ``<in>`` + CamelCase(``<g>``). Without an input contrast the label is just ``to_label(<g>)``.

    Parameters
    ----------
    input_contrast : str or None
        The first-level ``contrast`` entity of the maps in this model, if any.
    contrast_name : str
        The group-level contrast name as written in the model.

    Returns
    -------
    str

    Examples
    --------
    >>> group_contrast_label("faces", "intercept")
    'faces'
    >>> group_contrast_label("faces", "group.patient - group.control")
    'facesGroupPatientMinusGroupControl'
    >>> group_contrast_label(None, "age")
    'age'
    >>> group_contrast_label("", "1")
    'intercept'
    """
    group_label = to_label(contrast_name)
    if not input_contrast:
        return group_label
    input_label = to_label(input_contrast)
    if group_label == INTERCEPT:
        return input_label
    return input_label + _capitalise(group_label)


def node_label(name: str) -> str:
    """The label of a node's output folder (``node-<label>``).

    A node name is a name, not an expression: ``-``, ``_``, ``.`` and spaces are word breaks (as
    fitlins names its folders), where :func:`to_label` would read ``-`` as Minus.

    Examples
    --------
    >>> node_label("t-test"), node_label("one-sample_dataset"), node_label("groupComparison")
    ('tTest', 'oneSampleDataset', 'groupComparison')
    """
    text = str(name).strip()
    if text.isascii() and text.isalnum():
        return text
    words = re.findall(r"[A-Za-z0-9]+", text)
    if not words:
        raise ValueError(f"cannot make a BIDS label from {name!r}: it has no letter or digit")
    return words[0] + "".join(_capitalise(w) for w in words[1:])


def _fitlins_label(name: str) -> str:
    """fitlins' ``to_alphanum``: non-alphanumerics are word breaks, later words title-cased."""
    words = re.sub("[^a-zA-Z0-9]", "_", name).split("_")
    return words[0] + "".join(word.title() for word in words[1:])


def first_level_labels(name: str) -> tuple[str, ...]:
    """The ``contrast-<label>`` a first-level map of the contrast ``name`` may carry.

    A Dataset node receives maps by contrast *name* (an edge ``Filter``, a column of ``X``);
    files carry labels. bids-group's own rule, :func:`to_label`, comes first; fitlins names its
    outputs by another (``to_alphanum``: every non-alphanumeric character is a word break, so
    ``faces-scrambled`` gives ``facesScrambled`` where :func:`to_label` gives
    ``facesMinusScrambled``); both are accepted. Names that are labels already give themselves.

    Examples
    --------
    >>> first_level_labels("faces_vs_scrambled")
    ('facesVsScrambled',)
    >>> first_level_labels("faces-scrambled")
    ('facesMinusScrambled', 'facesScrambled')
    >>> first_level_labels("trial_type.word")
    ('trialTypeWord',)
    >>> first_level_labels("faces")
    ('faces',)
    """
    labels = [to_label(name)]
    fitlins = _fitlins_label(str(name).strip())
    if fitlins.isascii() and fitlins.isalnum():
        labels.append(fitlins)
    return tuple(dict.fromkeys(labels))
