"""Tokenising ahead of the model: a background thread packs windows into a bounded queue while the model runs
(the tokenizer releases the GIL), so the forward never waits on tokenisation that could have been done already."""
from __future__ import annotations

import queue
import threading

_END = object()


def ahead(iterator, depth: int = 256):
    """Yield iterator's items, produced by a daemon thread up to `depth` ahead; its exceptions re-raised here."""
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def worker():
        try:
            for item in iterator:
                while not stop.is_set():
                    try:
                        slots.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if stop.is_set():
                    return
            slots.put(_END)
        except BaseException as error:  # noqa: BLE001 - surfaced in the consumer
            slots.put(error)

    thread = threading.Thread(target=worker, daemon=True, name="sae-tokenize")
    thread.start()
    try:
        while True:
            item = slots.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)
