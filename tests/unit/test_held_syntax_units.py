"""Contexts the router proposes so a PACS sends each instance as it holds it (no peer needed)."""

from __future__ import annotations

from dicomrouter.net.get_client import MAX_STORAGE_CONTEXTS
from dicomrouter.retrieve.held_syntax import (
    CLASSES_PER_ASSOCIATION,
    COMPRESSED_SYNTAXES,
    HELD_SYNTAXES,
    fallback_contexts,
    held_syntax_contexts,
)
from dicomrouter.retrieve.relay import describe_reasons


def test_one_syntax_per_context_and_the_classes_fit_in_one_association():
    classes = [f"1.2.3.{n}" for n in range(CLASSES_PER_ASSOCIATION)]
    contexts = held_syntax_contexts(classes)
    assert all(len(syntaxes) == 1 for _, syntaxes in contexts)
    assert len(contexts) == len(classes) * len(HELD_SYNTAXES) <= MAX_STORAGE_CONTEXTS
    assert len(held_syntax_contexts([*classes, "1.2.4"])) > MAX_STORAGE_CONTEXTS
    assert {"1.2.840.10008.1.2", "1.2.840.10008.1.2.4.90"} <= set(HELD_SYNTAXES)


def test_fallback_offers_the_common_classes_every_syntax_within_the_limit():
    contexts = fallback_contexts()
    assert len(contexts) <= MAX_STORAGE_CONTEXTS
    ct = [syntaxes for sop, syntaxes in contexts if sop == "1.2.840.10008.5.1.4.1.1.2"]
    assert sorted(s for (s,) in ct) == sorted(HELD_SYNTAXES)
    assert all(len(s) == 1 or not set(s) & set(COMPRESSED_SYNTAXES) for _, s in contexts)


def test_refused_syntaxes_are_grouped_per_destination_in_the_comment():
    comment = describe_reasons(
        [
            "WS refuses JPEG2000",
            "WS refuses RLELossless",
            "Test PACS 1 could not send 2 instance(s)",
        ]
    )
    assert comment == "WS refuses JPEG2000, RLELossless; Test PACS 1 could not send 2 instance(s)"
