"""Posts to a mailing list: who may post (at RCPT), and the list's own copy (at commit).

  check_post(lists, rcpt, sender) -> Decision | None
      posting = "members": the ENVELOPE sender must be a member, else 550 5.7.1 naming
      the list, at RCPT (the client keeps the message: nothing is accepted and bounced).
      "anyone" and "moderated" accept every sender. The list's -bounces and -owner
      addresses take anyone's mail (LocalRecipients.expand sends it to the owner).
  split(stored, lists) -> [Copy]        (log_copies: their event=list_copy lines)
      The stored message with its list recipients taken out: every other recipient keeps
      the original (its id); each list gets a copy of its own: envelope sender
      <list>-bounces@domain (bounces reach the owner, never the poster), the members as
      recipients (a local alias expanded; a member that is a local list as its members),
      the list's header fields (mta/listheaders.py). On a moderated list the
      copy's recipients are stored held, "awaiting moderation by OWNER", and the owner
      gets a notice naming its id (`moderation_notice`); `mta queue release ID` sends it. When only lists remain, the first copy takes the original's id.
      A message that already carries the list's List-Id went through it before (a loop,
      e.g. two lists that are members of each other): it is not expanded again but goes,
      as it is, to the owner, who can fix the membership; so is a post to a list without
      members. Both are logged (event=list_loop, list_empty).

The caller commits every Copy in one transaction (GroupCommitter.commit_all) before its
250: the original and the list's copies are stored together or not at all.
"""

from __future__ import annotations

import dataclasses
import email.utils
from collections.abc import Callable
from dataclasses import dataclass

from mta import logs
from mta.listheaders import add_list_fields, carries_list_id, header_fields
from mta.lists import Lists, MailingList
from mta.smtp.replies import Reply
from mtaqueue import NewMessage, Recipient, new_id
from workers.inbound.decision import Decision

Expand = Callable[[str], list[str]]


@dataclass(frozen=True, slots=True)
class Copy:
    message: NewMessage
    list: str | None = None  # the list whose copy this is; None: the original
    held_for: str | None = None  # the owner, while the copy awaits moderation


def check_post(lists: Lists, rcpt: str, sender: str) -> Decision | None:
    """None when `sender` may send to `rcpt` (or `rcpt` is no list's post address)."""
    found = lists.find(rcpt) if lists else None
    if found is None:
        return None
    lst, role = found
    if role != "post" or lst.posting != "members" or lst.is_member(sender):
        return None
    return Decision(Reply(550, "5.7.1", f"<{lst.address}>: only members may post to this list"),
                    "list_members_only")


def split(stored: NewMessage, lists: Lists, expand: Expand = lambda address: [address]) -> list[Copy]:
    """The messages to store for `stored` (see the module's header); [Copy(stored)] when it
    has no list recipient. `expand`: a member's final addresses (LocalRecipients.expand:
    aliases, a list's -owner and -bounces)."""
    if not lists:  # no list configured: nothing to look up
        return [Copy(stored)]
    envelope = stored.envelope
    others: list[Recipient] = []
    posted: list[MailingList] = []
    for rcpt in envelope.recipients:
        found = lists.find(rcpt.address)
        if found is None or found[1] != "post":
            others.append(rcpt)
        elif found[0] not in posted:
            posted.append(found[0])
    if not posted:
        return [Copy(stored)]
    copies: list[Copy] = []
    for lst in posted:
        members = recipients_of(lst, lists, expand)
        looped = carries_list_id(stored.body, lst.list_id)
        if looped or not members:
            logs.event("list_loop" if looped else "list_empty", msgid=envelope.id, list=lst.address,
                       sender=envelope.sender, owner=lst.owner)
            others.append(Recipient(lst.owner, orcpt=f"rfc822;{lst.address}"))
            continue
        copies.append(_list_copy(stored, lst, members))
    if others:
        copies.insert(0, Copy(NewMessage(dataclasses.replace(envelope, recipients=_unique(others)), stored.body)))
    else:  # only lists: the first copy is the message the client sent
        first = copies[0]
        copies[0] = Copy(NewMessage(dataclasses.replace(first.message.envelope, id=envelope.id), first.message.body),
                         first.list, first.held_for)
    by_address = {lst.address: lst for lst in posted}
    return copies + [Copy(moderation_notice(c, by_address[c.list], stored))
                     for c in copies if c.held_for is not None and c.list is not None]


def log_copies(copies: list[Copy], posted: str) -> None:
    """One `event=list_copy` line per list copy stored for the message `posted`."""
    for copy in copies:
        if copy.list is not None:
            envelope = copy.message.envelope
            logs.event("list_copy", msgid=envelope.id, list=copy.list, posted=posted,
                       members=len(envelope.recipients), held_for=copy.held_for)


def recipients_of(lst: MailingList, lists: Lists, expand: Expand) -> list[str]:
    """Where the list's copy goes: its members, each once, a local alias as its targets, a
    member that is another list as that list's members (flattened: they get this list's
    copy; a list met again on the way is skipped), never one of this list's own addresses."""
    out: list[str] = []
    own = {a.lower() for a in (lst.address, lst.bounces, lst.owner_alias)}
    seen: set[str] = set()

    def add(address: str, within: frozenset[MailingList]) -> None:
        if address.lower() in own:
            return
        found = lists.find(address)
        if found is not None and found[1] == "post":
            if found[0] not in within:
                for member in found[0].members():
                    add(member, within | {found[0]})
            return
        for target in expand(address):
            if lists.find(target) is not None and target.lower() != address.lower():
                add(target, within)  # an alias naming a list
            elif target.lower() not in seen:
                seen.add(target.lower())
                out.append(target)

    for member in lst.members():
        add(member, frozenset({lst}))
    return out


def moderation_notice(held: Copy, lst: MailingList, stored: NewMessage) -> NewMessage:
    """The owner's notice that `held` (the list's copy of `stored`) waits for moderation:
    from <list>-bounces@ (its failure comes back to the owner, once), what to run to send it."""
    envelope, address = held.message.envelope, lst.address
    fields, _ = header_fields(stored.body)
    subject = next((" ".join(stored.body[s:e].partition(b":")[2].decode("ascii", "replace").split())
                    for name, s, e in fields if name == b"subject"), "")
    poster = stored.envelope.sender or "<>"
    text = (f"From: <{lst.owner_alias}>\r\nTo: <{lst.owner}>\r\n"
            f"Subject: {address}: a post from {poster} awaits moderation\r\n"
            f"Date: {email.utils.formatdate(envelope.arrival)}\r\nMessage-ID: <{envelope.id}.moderation@{lst.domain}>\r\n"
            "Auto-Submitted: auto-generated\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=us-ascii\r\n"
            f"\r\nA post to {address} is held for you:\r\n\r\n  queue id: {envelope.id}\r\n"
            f"  from:     {poster}\r\n  subject:  {subject[:200]}\r\n\r\n"
            f"Send it to the list:  mta queue release {envelope.id}\r\n"
            f"Drop it:              mta queue delete {envelope.id}\r\n")
    body = text.encode("ascii", "replace")
    notice = dataclasses.replace(envelope, id=new_id(), recipients=[Recipient(lst.owner)], size=len(body),
                                 body_type=None, smtputf8=False)
    return NewMessage(notice, body)


def _list_copy(stored: NewMessage, lst: MailingList, members: list[str]) -> Copy:
    held = lst.posting == "moderated"
    state, note = ("held", f"awaiting moderation by {lst.owner}") if held else ("ready", None)
    body = add_list_fields(stored.body, lst)
    envelope = dataclasses.replace(
        stored.envelope, id=new_id(), sender=lst.bounces, size=len(body), ret=None, envid=None,
        recipients=[Recipient(m, state=state, last_reply=note) for m in members],
        client={**stored.envelope.client, "list": lst.address})
    return Copy(NewMessage(envelope, body), lst.address, lst.owner if held else None)


def _unique(recipients: list[Recipient]) -> list[Recipient]:
    seen: set[str] = set()
    out = []
    for rcpt in recipients:
        if rcpt.address.lower() not in seen:
            seen.add(rcpt.address.lower())
            out.append(rcpt)
    return out
