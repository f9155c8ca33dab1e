"""dweepy's model for following many things: one thread per listen_for_dweets_from, as its
README shows, for `dweetpipe bench fanin` to measure beside the worker.

usage: python3 dweepy_listeners.py BASE_URL COUNT PREFIX
Prints "started" once every thread runs; then, for each line read on stdin, the number of
dweets received so far.
"""

import sys
import threading

import dweepy
import dweepy.streaming


def main(base_url, count, prefix):
    dweepy.streaming.BASE_URL = base_url
    received = [0]
    lock = threading.Lock()

    def follow(thing):
        for _dweet in dweepy.listen_for_dweets_from(thing, timeout=86400):
            with lock:
                received[0] += 1

    for index in range(1, count + 1):
        threading.Thread(target=follow, args=(f"{prefix}{index:04d}",), daemon=True).start()
    print("started", flush=True)
    for _request in sys.stdin:
        with lock:
            print(received[0], flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
