"""More tech-support problem / fix pairs, for held-out items beyond the ten of the chatterbot corpus.

``chatterbot-corpus``'s ``tech_support.yml`` has ten distinct problem / fix pairs, so its episodes (orderings of
those ten) ran out after two confirm splits of the reward-validity protocol (``python -m experiments.validity``).
:data:`EXTRA_PAIRS` are 48 more, written by this project in the corpus's style (a one-line problem in the first
person, a one-sentence fix) and committed before any item built from them was scored. None repeats a corpus
problem. :func:`~cagsr_reward.integrations.user_sim.load_tech_support` builds episodes from them with
``pairs=EXTRA_PAIRS``, exactly as from the corpus.

Example:
    >>> len(EXTRA_PAIRS), len({p for p, _ in EXTRA_PAIRS})
    (48, 48)
"""

from __future__ import annotations

__all__ = ["EXTRA_PAIRS"]

#: (problem, fix) pairs; the problem is a user turn, the fix its reference reply.
EXTRA_PAIRS: tuple[tuple[str, str], ...] = (
    ("My phone won't charge.", "Try another cable and clean any lint out of the charging port."),
    ("My Wi-Fi keeps disconnecting.", "Move closer to the router and update your wireless adapter driver."),
    ("My keyboard types the wrong characters.", "Check that the keyboard layout in your language settings is right."),
    ("My laptop battery drains very fast.", "Lower the screen brightness and close apps running in the background."),
    ("My Bluetooth headphones won't pair.", "Turn Bluetooth off and on, then put the headphones in pairing mode."),
    ("I'm not receiving any emails.", "Check your spam folder and make sure your mailbox is not full."),
    ("My computer is running very slowly.", "Restart it and uninstall programs you no longer use."),
    ("An app keeps crashing on my phone.", "Update the app, and reinstall it if it still crashes."),
    ("My hard drive is almost full.", "Empty the recycle bin and move large files to an external drive."),
    ("My microphone isn't working in video calls.", "Allow the app to use the microphone in your privacy settings."),
    ("My files won't sync to the cloud.", "Sign out of the sync app, sign back in, and check your storage quota."),
    ("My touchpad stopped working.", "Check that the touchpad isn't disabled with the function key."),
    ("My browser shows a certificate error.", "Make sure your computer's date and time are set correctly."),
    ("My external drive doesn't show up.", "Try a different USB cable and check whether it appears in Disk Management."),
    ("My phone's screen doesn't respond to touch.", "Remove the screen protector and restart the phone."),
    ("My computer shows a blue screen on startup.", "Boot into safe mode and undo the last driver or update you installed."),
    ("The fan in my laptop is very loud.", "Clean the vents with compressed air and check for programs using the CPU."),
    ("My printer says it is offline.", "Restart the printer and make sure it's on the same network as your computer."),
    ("My videos keep buffering.", "Lower the video quality or pause downloads on other devices."),
    ("My email attachments won't open.", "Save the file first and open it with the program it was made in."),
    ("I can't connect to the VPN.", "Check your username and password and try a different VPN server."),
    ("My second monitor isn't detected.", "Reconnect the cable and press the detect button in display settings."),
    ("My phone storage is full.", "Delete old videos and clear the cache of large apps."),
    ("My smart TV won't connect to the internet.", "Restart the TV and the router, then enter the Wi-Fi password again."),
    ("I can't install the update.", "Free up disk space and run the update troubleshooter."),
    ("My USB port isn't working.", "Restart the computer and try the device in a different port."),
    ("My account is locked.", "Wait fifteen minutes and then reset your password."),
    ("My documents won't print in color.", "Check the color ink levels and turn off grayscale in the print settings."),
    ("My computer clock is always wrong.", "Turn on automatic time sync, and replace the CMOS battery if it keeps resetting."),
    ("My tablet won't turn on.", "Charge it for thirty minutes and then hold the power button."),
    ("My speakers make a crackling noise.", "Check the speaker cable and turn the volume down on the computer."),
    ("I deleted a file by mistake.", "Look in the recycle bin and restore it from there."),
    ("My game keeps lagging.", "Lower the graphics settings and close other programs while you play."),
    ("My phone gets very hot.", "Take off the case and avoid using it while it charges."),
    ("My camera app shows a black screen.", "Close other apps that might be using the camera and restart the phone."),
    ("I can't log in to my email.", "Check that caps lock is off and reset your password if needed."),
    ("My scanner isn't recognized.", "Install the latest scanner driver from the manufacturer's website."),
    ("My website loads without images.", "Clear your browser cache and disable any ad blocker for that site."),
    ("My mouse cursor moves by itself.", "Clean the sensor and use a mouse pad on a flat surface."),
    ("My computer makes a clicking noise.", "Back up your files now, because the hard drive may be failing."),
    ("My Wi-Fi network doesn't appear.", "Make sure the router is broadcasting and Wi-Fi is switched on in settings."),
    ("My text messages aren't sending.", "Check your signal and confirm the message center number in settings."),
    ("My laptop won't wake from sleep.", "Hold the power button to restart it and update the chipset drivers."),
    ("My fonts look blurry.", "Set the display to its native resolution and turn on ClearType."),
    ("My antivirus blocked a program I need.", "Add the program to the antivirus exceptions list if you trust it."),
    ("My headphones only play sound in one ear.", "Check the audio balance setting and try another headphone jack."),
    ("My calendar events disappeared.", "Check that the calendar is still selected and sync your account again."),
    ("I can't open PDF files.", "Install a PDF reader and set it as the default app for PDF files."),
)
