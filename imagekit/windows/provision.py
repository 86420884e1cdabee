"""The provisioning script: what runs in the new Windows at its first log-on, up to sysprep.

Windows Setup runs it once (``FirstLogonCommands`` of the answer file) from the answer
ISO's ``imagekit`` folder. In order, each stage announced on COM1 as a line
``IMAGEKIT-STAGE <name>`` (the host reads the serial log):

1. ``drivers``: the publishers of the driver catalogues are trusted (no prompt), then every
   ``.inf`` on the answer ISO is added and installed with ``pnputil``;
2. ``guest-agent``: the QEMU guest agent from virtio-win (``msiexec``);
3. ``cloudbase-init``: its MSI with explicit properties (the user, its groups, password
   injection, ``LOGGINGSERIALPORTNAME=COM1``, the service account), then imagekit's
   ``cloudbase-init.conf`` and ``cloudbase-init-unattend.conf`` replace the MSI's, the
   ``LocalScripts`` folder is created and ``SetSetupComplete.cmd`` registers the
   specialize-time run and the service's start after it;
4. ``remote-desktop``: RDP and its firewall group on or off, as the recipe says;
5. ``user-script``: the recipe's extra PowerShell, if any;
6. ``cleanup``: per-user AppX packages that break sysprep on desktops removed; no
   automatic log-on, no answer file, no provisioning log left; the Administrator's build
   password replaced by a random one no one knows (cloudbase-init sets the cloud's; on
   desktops the account is disabled unless cloudbase-init uses it);
7. ``sysprep``: ``Sysprep /generalize /oobe /shutdown`` with cloudbase-init's own
   ``Unattend.xml``. The guest powering off after this marker is the build's success.

Any error stops the script with ``IMAGEKIT-FAILED <message>`` on COM1 (and sysprep not
shutting the machine down within two minutes does too), so the host fails fast with the
reason instead of waiting for its timeout.
"""

from __future__ import annotations

from dataclasses import dataclass

from imagekit.windows.cbinit import CloudbaseInitOptions

STAGE_MARKER = "IMAGEKIT-STAGE"
FAILED_MARKER = "IMAGEKIT-FAILED"
STAGES = ("provision", "drivers", "guest-agent", "cloudbase-init", "remote-desktop", "user-script", "cleanup",
          "sysprep")
SUCCESS_STAGE = "sysprep"
MSI_NAME = "CloudbaseInitSetup.msi"
USER_SCRIPT = "user.ps1"
PNPUTIL_OK = (0, 259, 1641, 3010)  # done, nothing to install for now, reboot started / needed


@dataclass(frozen=True)
class ProvisionOptions:
    cloudbase: CloudbaseInitOptions
    rdp: bool
    client: bool  # a desktop release (Windows 10, 11)
    user_script: bool = False
    run_service_as_local_system: bool = True


def _ps_quote(text: str) -> str:
    """A PowerShell single-quoted string."""
    return "'" + text.replace("'", "''") + "'"


def provision_command() -> str:
    """The first log-on command: find the answer ISO by its script and run it."""
    return ("powershell.exe -NoLogo -NoProfile -ExecutionPolicy Bypass -Command \"& (Get-PSDrive -PSProvider "
            "FileSystem | ForEach-Object { Join-Path $_.Root 'imagekit\\provision.ps1' } | Where-Object { Test-Path "
            "$_ } | Select-Object -First 1)\"")


_HEAD = r"""# imagekit: provisioning of a Windows build (runs once, at the first log-on); then sysprep.
$ErrorActionPreference = 'Stop'
$ProgressPreference = 'SilentlyContinue'
$Media = Split-Path -Parent $MyInvocation.MyCommand.Path
$Root = Split-Path -Parent $Media
$Log = Join-Path $env:SystemRoot 'Temp\imagekit-provision.log'
$CloudbaseInit = Join-Path $env:ProgramFiles 'Cloudbase Solutions\Cloudbase-Init'
Start-Transcript -Path $Log -Append | Out-Null

function Send-Serial([string]$Line) {
    try {
        $port = New-Object System.IO.Ports.SerialPort 'COM1', 115200, 'None', 8, 'One'
        $port.Open()
        $port.Write("`r`n$Line`r`n")
        $port.Close()
    } catch { Write-Warning "COM1: $_" }
}

function Set-Stage([string]$Name) {
    Write-Host "imagekit stage: $Name"
    Send-Serial "@STAGE@ $Name"
}

function Invoke-Checked([string]$File, [string[]]$Arguments, [int[]]$Ok = @(0)) {
    $p = Start-Process -FilePath $File -ArgumentList $Arguments -Wait -PassThru -NoNewWindow
    if ($Ok -notcontains $p.ExitCode) { throw "$File $($Arguments -join ' ') exited with status $($p.ExitCode)" }
}

trap {
    Send-Serial ("@FAILED@ " + ($_.Exception.Message -replace '[\r\n]+', ' '))
    try { Stop-Transcript | Out-Null } catch { }
    exit 1
}
"""

_DRIVERS = r"""
Set-Stage 'drivers'
$driverRoots = @((Join-Path $Root '$WinPEDriver$'), (Join-Path $Root 'drivers')) | Where-Object { Test-Path $_ }
$store = New-Object System.Security.Cryptography.X509Certificates.X509Store 'TrustedPublisher', 'LocalMachine'
$store.Open('ReadWrite')
Get-ChildItem -Path $driverRoots -Recurse -Filter *.cat | ForEach-Object {
    $cert = (Get-AuthenticodeSignature -FilePath $_.FullName).SignerCertificate
    if ($cert) { $store.Add($cert) }
}
$store.Close()
Get-ChildItem -Path $driverRoots -Recurse -Filter *.inf | ForEach-Object {
    Invoke-Checked (Join-Path $env:SystemRoot 'System32\pnputil.exe') @('/add-driver', "`"$($_.FullName)`"", '/install') @(@PNPUTIL_OK@)
}

Set-Stage 'guest-agent'
Invoke-Checked 'msiexec.exe' @('/i', "`"$(Join-Path $Media 'qemu-ga-x86_64.msi')`"", '/qn', '/norestart', '/l*v', "`"$(Join-Path $env:SystemRoot 'Temp\imagekit-qemu-ga.log')`"") @(0, 3010)
"""

_CLOUDBASE = r"""
Set-Stage 'cloudbase-init'
$msiLog = Join-Path $env:SystemRoot 'Temp\imagekit-cloudbase-init-msi.log'
Invoke-Checked 'msiexec.exe' @('/i', "`"$(Join-Path $Media '@MSI@')`"", '/qn', '/norestart', '/l*v', "`"$msiLog`"", @MSI_PROPERTIES@) @(0, 3010)
if (-not (Get-Service -Name cloudbase-init -ErrorAction SilentlyContinue)) { throw "the cloudbase-init service is not installed (see $msiLog)" }
Copy-Item -Force (Join-Path $Media 'cloudbase-init\cloudbase-init.conf') (Join-Path $CloudbaseInit 'conf\cloudbase-init.conf')
Copy-Item -Force (Join-Path $Media 'cloudbase-init\cloudbase-init-unattend.conf') (Join-Path $CloudbaseInit 'conf\cloudbase-init-unattend.conf')
New-Item -ItemType Directory -Force -Path (Join-Path $CloudbaseInit 'LocalScripts') | Out-Null
& (Join-Path $CloudbaseInit 'bin\SetSetupComplete.cmd')
if ($LASTEXITCODE) { throw "SetSetupComplete.cmd exited with status $LASTEXITCODE" }
# it runs in the cloud (SetupComplete.cmd starts it after the specialize run), not during the build
Stop-Service -Name cloudbase-init -ErrorAction SilentlyContinue
"""

_RDP = r"""
Set-Stage 'remote-desktop'
Set-ItemProperty -Path 'HKLM:\SYSTEM\CurrentControlSet\Control\Terminal Server' -Name fDenyTSConnections -Value @DENY@
Set-ItemProperty -Path 'HKLM:\SYSTEM\CurrentControlSet\Control\Terminal Server\WinStations\RDP-Tcp' -Name UserAuthentication -Value 1
@FIREWALL@ -Group '@FirewallAPI.dll,-28752'
"""

_USER = r"""
Set-Stage 'user-script'
& (Join-Path $Media '@USER@')
"""

_CLEANUP = r"""
Set-Stage 'cleanup'
if ($Client) {
    $provisioned = @(Get-AppxProvisionedPackage -Online | ForEach-Object { $_.DisplayName })
    Get-AppxPackage | Where-Object { -not $_.NonRemovable -and -not $_.IsFramework -and $provisioned -notcontains $_.Name } |
        ForEach-Object { Remove-AppxPackage -Package $_.PackageFullName -ErrorAction SilentlyContinue }
}
$winlogon = 'HKLM:\SOFTWARE\Microsoft\Windows NT\CurrentVersion\Winlogon'
Set-ItemProperty -Path $winlogon -Name AutoAdminLogon -Value '0'
Remove-ItemProperty -Path $winlogon -Name DefaultPassword, AutoLogonCount -ErrorAction SilentlyContinue
$answers = @('Panther\unattend.xml', 'Panther\Unattend\unattend.xml', 'Panther\unattend-original.xml', 'System32\Sysprep\unattend.xml') |
    ForEach-Object { Join-Path $env:SystemRoot $_ }
Remove-Item -Force -ErrorAction SilentlyContinue -Path ($answers + @((Join-Path $env:SystemDrive 'unattend.xml'), (Join-Path $env:SystemDrive 'autounattend.xml')))
$admin = Get-LocalUser | Where-Object { $_.SID.Value -like 'S-1-5-21-*-500' }
$bytes = New-Object byte[] 48
[System.Security.Cryptography.RandomNumberGenerator]::Create().GetBytes($bytes)
$admin | Set-LocalUser -Password (ConvertTo-SecureString ([Convert]::ToBase64String($bytes) + 'aA1!') -AsPlainText -Force)
if ($Client -and $admin.Name -ne @USER_NAME@) { $admin | Disable-LocalUser }
"""

_SYSPREP = r"""
Set-Stage 'sysprep'
try { Stop-Transcript | Out-Null } catch { }
Remove-Item -Force -ErrorAction SilentlyContinue -Path $Log
$sysprep = Start-Process -FilePath (Join-Path $env:SystemRoot 'System32\Sysprep\Sysprep.exe') -Wait -PassThru -ArgumentList @('/generalize', '/oobe', '/shutdown', '/quiet', "/unattend:`"$(Join-Path $CloudbaseInit 'conf\Unattend.xml')`"")
Start-Sleep -Seconds 120
$tail = Get-Content -Tail 5 -ErrorAction SilentlyContinue -Path (Join-Path $env:SystemRoot 'System32\Sysprep\Panther\setuperr.log')
Send-Serial ("@FAILED@ sysprep did not shut the machine down (exit status $($sysprep.ExitCode)): " + ($tail -join ' | '))
exit 1
"""


def msi_properties(o: ProvisionOptions) -> list[str]:
    """cloudbase-init's MSI properties, explicit (its defaults change between releases)."""
    cb = o.cloudbase
    return [f'USERNAME="{cb.username}"', f'USERGROUPS="{",".join(cb.groups)}"', "INJECTMETADATAPASSWORD=TRUE",
            "LOGGINGSERIALPORTNAME=COM1", f"RUN_SERVICE_AS_LOCAL_SYSTEM={1 if o.run_service_as_local_system else 0}"]


def script(o: ProvisionOptions) -> str:
    """``provision.ps1`` (CRLF line ends, as Windows tools expect)."""
    props = ", ".join(_ps_quote(p) for p in msi_properties(o))
    parts = [
        _HEAD.replace("@STAGE@", STAGE_MARKER).replace("@FAILED@", FAILED_MARKER),
        f"$Client = ${str(o.client).lower()}\n",
        "\nSet-Stage 'provision'\n",
        _DRIVERS.replace("@PNPUTIL_OK@", ", ".join(str(c) for c in PNPUTIL_OK)),
        _CLOUDBASE.replace("@MSI@", MSI_NAME).replace("@MSI_PROPERTIES@", props),
        _RDP.replace("@DENY@", "0" if o.rdp else "1")
            .replace("@FIREWALL@", "Enable-NetFirewallRule" if o.rdp else "Disable-NetFirewallRule"),
        _USER.replace("@USER@", USER_SCRIPT) if o.user_script else "",
        _CLEANUP.replace("@USER_NAME@", _ps_quote(o.cloudbase.username)),
        _SYSPREP.replace("@FAILED@", FAILED_MARKER),
    ]
    return "".join(parts).replace("\r\n", "\n").replace("\n", "\r\n")

