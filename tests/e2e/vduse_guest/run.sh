# Run inside the test guest by the `script` workload (sh /host/<this file>): enter the host's root
# (shared read-only over 9p at /host) with the guest's own /dev, /proc, /sys and a writable /run, and run
# check.py with the host's Python and venv. A chroot keeps every absolute path (the venv, the Numba cache
# index, /usr/sbin/vdpa) as it is on the host. /tmp is left as the host's (read-only): the checkout or the
# cache may live there; everything writable goes to the tmpfs on /run (TMPDIR, HOME, the Numba cache).
here=$(dirname "$0")
here=${here#/host}
repo=${here%/tests/e2e/vduse_guest}
for d in dev proc sys; do mount -o bind "/$d" "/host/$d" || exit 1; done
mount -t tmpfs tmpfs /host/run || exit 1
cache=$(sed -n 's/.*vdpasim\.numba_cache=\([^ ]*\).*/\1/p' /proc/cmdline)
chroot /host /bin/sh -c "
	t0=\$(date +%s%N)
	mkdir -p /run/tmp /run/numba && { [ -z '$cache' ] || cp -r '$cache'/. /run/numba/; }
	echo \"VDPASIM-RESULT {\\\"type\\\":\\\"numba-cache-copy\\\",\\\"ms\\\":\$(( (\$(date +%s%N) - t0) / 1000000 ))}\"
	cd '$repo' && PYTHONPATH='$repo' NUMBA_CACHE_DIR=/run/numba NUMBA_CPU_NAME=generic HOME=/run TMPDIR=/run/tmp \
		exec '$repo/.venv/bin/python' '$here/check.py'
"
rc=$?
umount /host/run /host/sys /host/proc /host/dev
exit $rc
