"""The PKCS#11 backend: AES keys that never leave an HSM. Nothing outside this package imports its
modules except the backend registry.
"""
