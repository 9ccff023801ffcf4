"""Sequential-MNIST QAT demo (placeholder until the training issue lands)."""
print("qs4d_np: the sMNIST QAT demo is not built yet; `make test` runs the test suite.")
