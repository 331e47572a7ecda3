"""The demo's dependency, installed by the fleet before the tests run."""

import unittest

import demogreet


class DependencyTest(unittest.TestCase):
    def test_the_locked_dependency_is_installed(self):
        self.assertEqual(demogreet.VERSION, "1.0")
        self.assertEqual(demogreet.greeting("fleet"), "Hello, fleet!")
