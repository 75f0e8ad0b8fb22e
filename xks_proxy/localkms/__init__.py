"""A local AWS KMS (issue 14): the KMS API on its real wire protocol, in front of any XKS proxy.

`xks-proxy local-kms` serves JSON 1.1 (`X-Amz-Target: TrentService.<Operation>`, SigV4 service
`kms`) so boto3, the AWS CLI and the AWS Encryption SDK need only an endpoint override. Its
state lives in one directory (SQLite, every secret sealed under a master key of its own seal).

Modules, by noun: `service` (HTTP, authentication, dispatch), `model` (botocore's KMS model as
the validator), `errors` (KMS exceptions as KMS sends them), `home` (the state directory and its
seal), `state` (SQLite), `principals`, `keys` (key metadata and lifecycle), `aliases`, `imports`
(imported key material), `stores` (external key stores), `ciphertext` (the blob format),
`cryptoops` (Encrypt, Decrypt, data keys, ReEncrypt), `xks` (the XKS client, calling a proxy as
KMS does). This package file imports none of them.
"""
