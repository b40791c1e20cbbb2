"""
L{poststack_relay.fleet.LocalState}: one relay's counters and notes.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from poststack_relay.fleet import LocalState
from poststack_relay.interfaces import IFleetState


class LocalStateTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.state = LocalState(self.clock, max_counters=5, max_notes=3)

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(IFleetState, self.state))

    def test_add_counts(self) -> None:
        self.assertEqual(self.state.add(["a", "b"], 10), [1, 1])
        self.assertEqual(self.state.add(["a"], 10), [2])
        self.assertEqual(self.state.counts(["a", "b", "c"]), [2, 1, 0])
        self.assertEqual(len(self.state), 2)

    def test_window_slides(self) -> None:
        """
        A count lives C{window} seconds after its last addition.
        """
        self.state.add(["a"], 10)
        self.clock.advance(9)
        self.state.add(["a"], 10)
        self.clock.advance(9)
        self.assertEqual(self.state.counts(["a"]), [2])
        self.clock.advance(1)
        self.assertEqual(self.state.counts(["a"]), [0])
        self.assertEqual(len(self.state), 0)
        self.assertEqual(self.state.add(["a"], 10), [1])

    def test_seconds_left(self) -> None:
        """
        The seconds until a count is forgotten: its window from its last
        addition; 0 once it is gone, or for a key never counted.
        """
        self.state.add(["a"], 10)
        self.clock.advance(4)
        self.assertEqual(self.state.seconds_left(["a", "b"]), [6.0, 0.0])
        self.state.add(["a"], 10)
        self.assertEqual(self.state.seconds_left(["a"]), [10.0])
        self.clock.advance(10)
        self.assertEqual(self.state.seconds_left(["a"]), [0.0])

    def test_put_count(self) -> None:
        """
        What the fleet says replaces a smaller count of this relay's.
        """
        self.state.add(["a"], 10)
        self.state.put_count("a", 7, 5)
        self.assertEqual(self.state.counts(["a"]), [7])
        self.assertEqual(self.state.add(["a"], 10), [8])
        self.state.put_count("b", 3, 5)
        self.clock.advance(5)
        self.assertEqual(self.state.counts(["b"]), [0])

    def test_put_count_never_lowers(self) -> None:
        """
        A smaller count heard (an announcement overtaken by this relay's
        later additions, or Redis's count after failures counted while it
        did not answer) does not lower a live count; it restarts its
        window.  Once the window has passed, what is heard is taken.
        """
        for _ in range(3):
            self.state.add(["a"], 10)
        self.clock.advance(8)
        self.state.put_count("a", 1, 10)
        self.assertEqual(self.state.counts(["a"]), [3])
        self.clock.advance(9)
        self.assertEqual(self.state.counts(["a"]), [3])
        self.clock.advance(1)
        self.state.put_count("a", 1, 10)
        self.assertEqual(self.state.counts(["a"]), [1])

    def test_counters_bounded(self) -> None:
        """
        Past C{max_counters}, the least recently changed are forgotten.
        """
        for n in range(8):
            self.state.add([f"k{n}"], 100)
        self.assertEqual(len(self.state), 5)
        self.assertEqual(self.state.counts(["k0", "k2", "k3", "k7"]), [0, 0, 1, 1])

    def test_notes(self) -> None:
        self.assertIsNone(self.state.recall("s"))
        self.state.remember("s", "rate", 5)
        self.assertEqual(self.state.recall("s"), ("rate", 5.0))
        self.clock.advance(2)
        self.assertEqual(self.state.recall("s"), ("rate", 3.0))
        self.state.remember("s", "other", 1)
        self.assertEqual(self.state.recall("s"), ("other", 1.0))
        self.clock.advance(1)
        self.assertIsNone(self.state.recall("s"))

    def test_note_zero_forgets(self) -> None:
        self.state.remember("s", "rate", 5)
        self.state.remember("s", "rate", 0)
        self.assertIsNone(self.state.recall("s"))

    def test_notes_bounded(self) -> None:
        for n in range(5):
            self.state.remember(f"s{n}", "v", 100)
        self.assertIsNone(self.state.recall("s0"))
        self.assertIsNone(self.state.recall("s1"))
        self.assertEqual(self.state.recall("s4"), ("v", 100.0))
