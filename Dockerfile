# The proxy image. The home (config, master key, vault) lives on a volume at /var/lib/xks-proxy.
FROM python:3.11-slim
# A fixed numeric uid for USER: a name may not resolve outside the image (hadolint DL3066).
RUN useradd --system --uid 10001 --home-dir /var/lib/xks-proxy --create-home xks
WORKDIR /src
COPY pyproject.toml README.md ./
COPY xks_proxy ./xks_proxy
COPY keymanager ./keymanager
RUN pip install --no-cache-dir . && rm -rf /src
COPY docker/entrypoint.sh /usr/local/bin/xks-proxy-entrypoint
USER 10001
ENV XKS_PROXY_HOME=/var/lib/xks-proxy
VOLUME ["/var/lib/xks-proxy"]
EXPOSE 8443
ENTRYPOINT ["xks-proxy-entrypoint"]
CMD ["serve", "--host", "0.0.0.0"]
