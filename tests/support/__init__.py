"""What only the tests need: test beds, harnesses and helpers shared between test modules."""
