# %postun of driftwatch-collector ($1: 0 erase, 1 upgrade): %systemd_postun_with_restart. RPM has no
# purge: the state in /var/lib/driftwatch-collector stays after an erase (remove it by hand).
systemctl daemon-reload >/dev/null 2>&1 || :
if [ "$1" -ge 1 ]; then
    systemctl try-restart driftwatch-collector.service >/dev/null 2>&1 || :
fi
