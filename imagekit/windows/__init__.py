"""Windows images from a Linux host: the parts of the ``windows`` build method and of Windows customisation.

=================  ==============================================================================
``catalog``        the releases (OS ids ``2k22``, ``2k19``, ``w11``, ``w10``): libosinfo id, builds, needs
``timezones``      IANA time zone names to Windows names (CLDR)
``unattend``       ``autounattend.xml`` (windowsPE disk layout and drivers, specialize, oobeSystem)
``cbinit``         cloudbase-init's two configuration files; recipe options checked against its own
``cbinit_table``   cloudbase-init's options, plugins and metadata services (generated from its package)
``provision``      the PowerShell script run at the first log-on, up to sysprep; the COM1 stage markers
``isofs``          reading ISOs (UDF, Joliet, ISO 9660) and folders alike; writing the answer ISO
``media``          the editions of ``install.wim``, read with wimlib without copying the WIM
``drivers``        the virtio-win drivers of one release, every referenced file checked
``answer``         the answer ISO's content
``qmp``            a small QMP client
``install``        QEMU (q35, OVMF, swtpm) running Setup, watched through QMP and the serial log
``hives``          registry hives with hivex, a guest's hives through libguestfs
``offline``        the checks of a finished image
``inventory``      edition, build and drivers for ``imagekit inspect --guest``
``build``          one build from inputs to checked image (called by ``imagekit.builders.windows``)
=================  ==============================================================================
"""
