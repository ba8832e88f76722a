import pytest
def test_fails_in_vm():
    print("guest stdout line")
    assert open("/proc/version").read() == "nope"
def test_skips_in_vm():
    pytest.skip("because reasons")
@pytest.mark.xfail(reason="known")
def test_xfail_in_vm():
    assert False
@pytest.mark.skipif(not __import__("os").path.exists("/dev/cachefiles"), reason="no cachefiles")
def test_skipif_evaluated_in_guest():
    pass
