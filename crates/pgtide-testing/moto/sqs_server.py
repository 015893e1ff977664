"""moto's server for pgtide's SQS tests, with each receive's scan made atomic.

moto 5.2 checks that a message is visible and marks it received without a lock, while its
server answers requests on threads: two receives at the same moment can both take one message,
which SQS never does inside the visibility timeout (pgtide's competing-consumers case sees it).
Here one scan runs at a time; a long poll still waits outside the lock, woken by a send.

Usage: python3 sqs_server.py -H 127.0.0.1 -p PORT (the arguments of moto_server).
"""

import sys
import threading
import time

from moto.server import main
from moto.sqs.models import SQSBackend

_scan = threading.Lock()
_receive = SQSBackend.receive_message


def receive_message(self, queue_name, count, wait_seconds_timeout, visibility_timeout,
                    message_attribute_names=None):
    end = time.monotonic() + wait_seconds_timeout
    while True:
        with _scan:
            result = _receive(self, queue_name, count, 0, visibility_timeout,
                              message_attribute_names)
        left = end - time.monotonic()
        if result or left <= 0:
            return result
        # Woken by a send; re-checks at least every second for delays and leases running out.
        self.get_queue(queue_name).wait_for_messages(min(left, 1.0))
        # Visible messages that another receive took first: do not spin.
        time.sleep(0.005)


SQSBackend.receive_message = receive_message

if __name__ == "__main__":
    main(sys.argv[1:])
