"""Engine tests run the models on the kernels' torch twins (the Triton interpreter is far too slow for whole
generations); test_llm_triton.py runs one small generation through the interpreted Triton kernels."""
# the `twins` fixture is tests/conftest.py's
