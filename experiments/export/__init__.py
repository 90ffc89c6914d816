"""Writing a finished arm's SAE in other libraries' formats."""
