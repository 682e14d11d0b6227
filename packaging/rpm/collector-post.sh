# %post of driftwatch-collector ($1: 1 install, 2 upgrade). The %systemd_post macros, spelled out:
# cargo-generate-rpm does not expand rpm macros.
systemd-sysusers /usr/lib/sysusers.d/driftwatch-collector.conf || :
systemd-tmpfiles --create /usr/lib/tmpfiles.d/driftwatch-collector.conf >/dev/null 2>&1 || :
mkdir -p -m 0755 /etc/driftwatch/collector.d
if [ "$1" -eq 1 ]; then
    systemctl --no-reload preset driftwatch-collector.service >/dev/null 2>&1 || :
fi
