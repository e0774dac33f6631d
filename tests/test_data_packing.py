"""Packing: documents joined with EOS, cut into rows of exactly seq_len, carried across batches."""

import numpy as np
import pytest

from fastdraft.data.packing import Packer, join_with_eos, pack_with_eos

EOS = 0


def random_docs(n: int, seed: int = 0, max_len: int = 40) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 500, size=rng.integers(0, max_len)).tolist() for _ in range(n)]


def split_on_eos(stream: np.ndarray) -> list[list[int]]:
    docs, start = [], 0
    for i in np.flatnonzero(stream == EOS):
        docs.append(stream[start:i].tolist())
        start = i + 1
    return docs


def test_join_puts_one_eos_after_every_document():
    assert join_with_eos([[5, 6], [], [7]], EOS).tolist() == [5, 6, 0, 0, 7, 0]
    assert join_with_eos([], EOS).dtype == np.int32


@pytest.mark.parametrize("seq_len", [8, 16, 33])
def test_every_row_is_exactly_seq_len_and_rows_plus_remainder_are_the_documents_in_order(seq_len):
    docs = random_docs(50)
    rows, rest = pack_with_eos(docs, EOS, seq_len)
    assert rows.dtype == np.int32 and rows.shape[1] == seq_len
    assert len(rest) < seq_len
    assert split_on_eos(np.concatenate([rows.reshape(-1), rest])) == docs


def test_a_document_longer_than_many_rows_spans_them_unchanged():
    long_doc = list(range(1, 1001))
    rows, rest = pack_with_eos([[7, 8], long_doc, [9]], EOS, seq_len=64)
    assert len(rows) == (2 + 1 + 1000 + 1 + 1 + 1) // 64
    assert split_on_eos(np.concatenate([rows.reshape(-1), rest])) == [[7, 8], long_doc, [9]]


def test_packer_carries_the_tail_so_batches_pack_like_one_stream():
    docs = random_docs(120, seed=1)
    packer = Packer(EOS, 16)
    rows = np.concatenate([packer.add(docs[i : i + 7]) for i in range(0, len(docs), 7)])
    whole, rest = pack_with_eos(docs, EOS, 16)
    np.testing.assert_array_equal(rows, whole)
    assert packer.tail == len(rest)
